"""Problem sources: where the RL loop takes each step's problems from, and where its feedback goes.

The contract (`ProblemSource`):
  batch(step, n) -> n problems for this step;
  update(problems, experience) after the step's rollouts (feedback for a stateful source, such as the
    ExIt buffer; a no-op for the stateless ones here);
  state_dict() -> a JSON-serialisable dict, saved in every checkpoint's meta;
  load_state_dict(d) restores it on resume, so a resumed run draws exactly the problems an
    uninterrupted one would.
`TaskSource` and `DatasetSource` are pure functions of (seed, step, n); their state is their identity,
and `load_state_dict` checks that a resumed run uses the same source.

Multi-host: `train_rl` asks each process for its own n = prompts_per_step / process_count problems. A source that
yields each process its own share says so with `per_process = True`; the stateless sources here draw the global
batch of the step and hand each process its contiguous slice, so the run sees the problems one process would.
"""
from __future__ import annotations

import random
from typing import Protocol, Sequence

import jax

from exrl.tasks.base import Problem


class ProblemSource(Protocol):
  def batch(self, step: int, n: int) -> list[Problem]: ...
  def update(self, problems: Sequence[Problem], experience) -> None: ...
  def state_dict(self) -> dict: ...
  def load_state_dict(self, state: dict) -> None: ...


class StatelessSource:
  """Base for sources that are pure functions of the step: no feedback, and state is identity only.

  Subclasses implement `draw(step, n)`, the step's global batch; `batch` hands this process its slice of it.
  """

  per_process = True

  def batch(self, step: int, n: int) -> list[Problem]:
    procs, me = jax.process_count(), jax.process_index()
    problems = self.draw(step, n * procs)
    return problems[me * n:(me + 1) * n]

  def update(self, problems: Sequence[Problem], experience) -> None:
    del problems, experience

  def load_state_dict(self, state: dict) -> None:
    mine = self.state_dict()
    if state != mine:
      raise ValueError(f"the checkpoint was written with source {state}, but this run uses {mine}; "
                       f"resume with the same source, or start a new run_dir")


class TaskSource(StatelessSource):
  """Fresh problems from a built-in task generator for every step (train split only)."""

  def __init__(self, task, seed: int = 0):
    self.task, self.seed = task, seed

  def draw(self, step: int, n: int) -> list[Problem]:
    # unique=False: a small task space must not run out over many steps.
    return self.task.generate(n, seed=self.seed * 1_000_003 + step, split="train", unique=False)

  def state_dict(self) -> dict:
    return {"kind": "task", "task": self.task.name, "seed": self.seed}


class DatasetSource(StatelessSource):
  """Epochs over a fixed list of problems, reshuffled per epoch from the seed."""

  def __init__(self, problems: Sequence[Problem], seed: int = 0):
    if not problems:
      raise ValueError("DatasetSource got no problems; the dataset is empty")
    self.problems, self.seed = list(problems), seed

  def _order(self, epoch: int) -> list[int]:
    order = list(range(len(self.problems)))
    random.Random(f"{self.seed}|{epoch}").shuffle(order)
    return order

  def draw(self, step: int, n: int) -> list[Problem]:
    out, size = [], len(self.problems)
    for i in range(step * n, step * n + n):
      epoch, pos = divmod(i, size)
      out.append(self.problems[self._order(epoch)[pos]])
    return out

  def state_dict(self) -> dict:
    return {"kind": "dataset", "size": len(self.problems), "seed": self.seed}
