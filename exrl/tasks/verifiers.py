"""Verifiers by task name: module-level functions, picklable by reference, so worker processes run them cheaply.

The self-iteration task (ExIt) registers its own verifier when `exrl.tasks.self_iteration` is imported, since it
reads the base task's verifier from here.
"""
from __future__ import annotations

from collections.abc import Callable

from exrl.tasks.arithmetic import ArithmeticTask, verify_direct_int
from exrl.tasks.base import Problem
from exrl.tasks.countdown import CountdownTask, verify_countdown
from exrl.tasks.math_data import MathDatasetTask, verify_math
from exrl.tasks.running_sum import RunningSumTask
from exrl.tasks.scratchpad import ChainSumTask, DigitSumTask, verify_marked_int

VERIFIERS: dict[str, Callable[[str, Problem], float]] = {
    ArithmeticTask.name: verify_direct_int,
    ChainSumTask.name: verify_marked_int,
    CountdownTask.name: verify_countdown,
    DigitSumTask.name: verify_marked_int,
    MathDatasetTask.name: verify_math,
    RunningSumTask.name: verify_marked_int,
}


def get_verifier(task_name: str) -> Callable[[str, Problem], float]:
  """The verifier for problems whose `.task` is `task_name`."""
  if task_name not in VERIFIERS:
    raise ValueError(f"no verifier for task {task_name!r}; tasks with verifiers: {sorted(VERIFIERS)}")
  return VERIFIERS[task_name]
