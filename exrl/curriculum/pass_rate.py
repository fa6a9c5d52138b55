"""ScaleRL "no positive resampling": drop, for good, problems the policy already solves (arXiv 2510.13786).

`PassRateSource(inner)` wraps any `ProblemSource`. `update` adds each trace's pass (traces["correct"] when the
collector gives it, else reward >= pass_reward) to its problem's history; once a problem has at least
`min_attempts` attempts and a historical pass rate >= `threshold` (0.9 in the paper) it is never served again.
`batch(step, n)` draws from the inner source, skips dropped problems, and keeps drawing until it has n; the
inner source is advanced by a draw counter, so the stream is deterministic. The history, the dropped set and the
counter are in `state_dict`, so they live in the checkpoint and a resumed run serves exactly the same problems.
ScaleRL's reason: prompts the model already passes give (near) zero-variance groups and no learning signal,
and spending rollouts on them slows the approach to the asymptote.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from exrl.curriculum.source import ProblemSource
from exrl.tasks.base import Problem


def problem_key(p: Problem) -> str:
  """A stable id for a problem across steps and restarts (task, prompt and answer; meta ignored)."""
  return hashlib.sha1(f"{p.task}\x1f{p.prompt}\x1f{p.answer}".encode()).hexdigest()[:16]


class PassRateSource:
  """No-positive-resampling wrapper around a ProblemSource (see the module docstring)."""

  def __init__(self, inner: ProblemSource, threshold: float = 0.9, min_attempts: int = 1, pass_reward: float = 1.0,
               max_draws_per_batch: int = 64):
    if not 0 < threshold <= 1:
      raise ValueError(f"PassRateSource threshold={threshold}; valid: 0 < threshold <= 1")
    if min_attempts < 1:
      raise ValueError(f"PassRateSource min_attempts={min_attempts} must be >= 1")
    self.inner, self.threshold, self.min_attempts = inner, threshold, min_attempts
    self.pass_reward, self.max_draws_per_batch = pass_reward, max_draws_per_batch
    self.history: dict[str, list[int]] = {}  # key -> [passes, attempts]
    self.dropped: set[str] = set()
    self.draw = 0  # inner batches drawn so far
    self.skipped = 0  # problems skipped because they were dropped (monitoring)

  def batch(self, step: int, n: int) -> list[Problem]:
    del step  # the inner stream is indexed by the draw counter, which the checkpoint restores
    out: list[Problem] = []
    for _ in range(self.max_draws_per_batch):
      for p in self.inner.batch(self.draw, n):
        if problem_key(p) in self.dropped:
          self.skipped += 1
        elif len(out) < n:
          out.append(p)
      self.draw += 1
      if len(out) == n:
        return out
    raise RuntimeError(f"PassRateSource: {self.max_draws_per_batch} draws of {n} gave only {len(out)} problems "
                       f"below pass rate {self.threshold}; {len(self.dropped)} problems are dropped. The policy "
                       f"solves (nearly) the whole source: use a harder source or a higher threshold")

  def update(self, problems: Sequence[Problem], experience) -> None:
    traces = experience.traces
    idx = np.asarray(traces["problem"], np.int64)
    if "correct" in traces:
      passed = np.asarray(traces["correct"], np.float64) > 0
    else:
      passed = np.asarray(traces["reward"], np.float64) >= self.pass_reward
    if idx.size and (idx.min() < 0 or idx.max() >= len(problems)):
      raise ValueError(f"traces['problem'] holds indices in [{idx.min()}, {idx.max()}] but the step has "
                       f"{len(problems)} problems")
    for i, p in enumerate(problems):
      mine = idx == i
      if not mine.any():
        continue
      key = problem_key(p)
      h = self.history.setdefault(key, [0, 0])
      h[0] += int(passed[mine].sum())
      h[1] += int(mine.sum())
      if h[1] >= self.min_attempts and h[0] >= self.threshold * h[1]:
        self.dropped.add(key)
    self.inner.update(problems, experience)

  def pass_rate(self, p: Problem) -> float | None:
    h = self.history.get(problem_key(p))
    return h[0] / h[1] if h else None

  def state_dict(self) -> dict:
    return {"kind": "pass_rate", "threshold": self.threshold, "min_attempts": self.min_attempts,
            "pass_reward": self.pass_reward, "draw": self.draw, "skipped": self.skipped,
            "history": {k: list(v) for k, v in sorted(self.history.items())}, "dropped": sorted(self.dropped),
            "inner": self.inner.state_dict()}

  def load_state_dict(self, state: dict) -> None:
    if state.get("kind") != "pass_rate":
      raise ValueError(f"the checkpoint's source state is {state.get('kind')!r}, not 'pass_rate'; resume with the "
                       f"same source, or start a new run_dir")
    mine = (self.threshold, self.min_attempts, self.pass_reward)
    theirs = (state["threshold"], state["min_attempts"], state["pass_reward"])
    if mine != theirs:
      raise ValueError(f"the checkpoint used (threshold, min_attempts, pass_reward)={theirs}, this run {mine}")
    self.inner.load_state_dict(state["inner"])
    self.draw, self.skipped = int(state["draw"]), int(state["skipped"])
    self.history = {k: [int(a), int(b)] for k, (a, b) in state["history"].items()}
    self.dropped = set(state["dropped"])
