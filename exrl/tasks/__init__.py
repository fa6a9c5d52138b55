"""Built-in tasks with verifiers, a registry, and loaders for local math datasets.

  task = get_task("chain_sum", num_terms=4)
  train = task.generate(1000, seed=0, split="train")
  test = task.generate(500, seed=0, split="eval")    # never overlaps any train split
  task.verify("7+5=12. answer: 12", train[0])        # -> 0.0 or 1.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from exrl.tasks.arithmetic import ArithmeticTask, verify_direct_int
from exrl.tasks.countdown import CountdownTask, verify_countdown
from exrl.tasks.base import (ANSWER_MARKER, SPLITS, Problem, Task, extract_marked_int, in_eval_split, parse_int)
from exrl.tasks.math_data import (MathDatasetTask, extract_boxed, extract_final_answer, load_math_dataset,
                                  verify_math)
from exrl.tasks.running_sum import RunningSumTask
from exrl.tasks.scratchpad import ChainSumTask, DigitSumTask, verify_marked_int
from exrl.tasks.self_iteration import TASK_NAME as SELF_ITERATION  # noqa: F401  (registers its verifier)
from exrl.tasks.verifiers import VERIFIERS, get_verifier

TASKS: dict[str, type] = {
    ArithmeticTask.name: ArithmeticTask,
    ChainSumTask.name: ChainSumTask,
    CountdownTask.name: CountdownTask,
    DigitSumTask.name: DigitSumTask,
    MathDatasetTask.name: MathDatasetTask,
    RunningSumTask.name: RunningSumTask,
}

def get_task(name: str, **kwargs) -> Task:
  """The task `name` built with `kwargs` (its dataclass fields)."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; valid names: {sorted(TASKS)}")
  cls = TASKS[name]
  fields = [f.name for f in dataclasses.fields(cls)]
  bad = sorted(set(kwargs) - set(fields))
  if bad:
    raise TypeError(f"task {name!r} got unknown options {bad}; valid options: {fields}")
  return cls(**kwargs)


def tokenizer_corpus(tasks: Iterable[Task], n_per_task: int = 2000, seed: int = 0) -> list[str]:
  """Prompts and SFT targets from both splits of each task: text to train a tokenizer that covers them all."""
  out = []
  for t in tasks:
    for split in SPLITS:
      for p in t.generate(n_per_task, seed, split, unique=False):
        out += [p.prompt, t.sft_target(p)]
  return out


__all__ = [
    "ANSWER_MARKER", "SPLITS", "TASKS", "VERIFIERS", "ArithmeticTask", "ChainSumTask", "DigitSumTask",
    "MathDatasetTask", "Problem", "RunningSumTask", "Task", "extract_boxed", "extract_final_answer", "extract_marked_int", "get_task",
    "get_verifier", "in_eval_split", "load_math_dataset", "parse_int", "tokenizer_corpus", "verify_direct_int",
    "verify_marked_int", "verify_math",
]
