"""Prompt sources: where the RL loop takes each step's problems from.

A source is stateless in the step: `batch(step, n)` is a pure function of (seed, step, n), so a
resumed run sees exactly the problems the killed run would have seen, and the checkpoint only
needs the step. (The ExIt buffer, which has state, saves it through `state_dict`.)
"""
from __future__ import annotations

import random
from typing import Protocol, Sequence

from exrl.tasks.base import Problem


class ProblemSource(Protocol):
  def batch(self, step: int, n: int) -> list[Problem]: ...
  def state_dict(self) -> dict: ...


class TaskSource:
  """Fresh problems from a built-in task generator for every step (train split only)."""

  def __init__(self, task, seed: int = 0):
    self.task, self.seed = task, seed

  def batch(self, step: int, n: int) -> list[Problem]:
    # unique=False: a small task space must not run out over many steps.
    return self.task.generate(n, seed=self.seed * 1_000_003 + step, split="train", unique=False)

  def state_dict(self) -> dict:
    return {"kind": "task", "task": self.task.name, "seed": self.seed}


class DatasetSource:
  """Epochs over a fixed list of problems, reshuffled per epoch from the seed."""

  def __init__(self, problems: Sequence[Problem], seed: int = 0):
    if not problems:
      raise ValueError("DatasetSource got no problems; the dataset is empty")
    self.problems, self.seed = list(problems), seed

  def _order(self, epoch: int) -> list[int]:
    order = list(range(len(self.problems)))
    random.Random(f"{self.seed}|{epoch}").shuffle(order)
    return order

  def batch(self, step: int, n: int) -> list[Problem]:
    out, size = [], len(self.problems)
    for i in range(step * n, step * n + n):
      epoch, pos = divmod(i, size)
      out.append(self.problems[self._order(epoch)[pos]])
    return out

  def state_dict(self) -> dict:
    return {"kind": "dataset", "size": len(self.problems), "seed": self.seed}
