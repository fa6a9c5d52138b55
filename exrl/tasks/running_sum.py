"""A long-reasoning task whose state fits in a few tokens: a running total written out step by step (Delethink).

  "13:1:94," -> "12:1:95,11:1:96,10:1:97,...,00:1:07. answer: 07"

The query is the first state "steps to go : increment : total" (13 steps of +1 from 94, modulo 100). Each
step writes the next state: one step fewer to go, the same increment, the total plus the increment, so
every step is the same eight tokens, the written solution grows linearly with n, and the next step depends
only on the last one. The trace stops after the state with 00 steps to go. A Markovian thinker that keeps the
query and a short tail of its own text can go on for any n (up to 99). A trace of n steps only shows
counters below n: a model asked for longer traces than it was trained on meets counters it never wrote,
unless it was also trained on chunks of long traces (`exrl.rollout.markov.chunk_examples`).

The verifier reads the integer after the LAST "answer:" and compares it with (start + n * add) mod 100.
"""
from __future__ import annotations

import dataclasses
import random
from typing import ClassVar

from exrl.tasks import base


def state(to_go: int, add: int, total: int) -> str:
  return f"{to_go:02d}:{add}:{total:02d}"


def solution(start: int, add: int, steps: int) -> str:
  """The written solution of the query `state(steps, add, start) + ","`."""
  lines, total = [], start
  for to_go in range(steps - 1, -1, -1):
    total = (total + add) % 100
    lines.append(state(to_go, add, total))
  return f"{','.join(lines)}. {base.ANSWER_MARKER} {total:02d}"


@dataclasses.dataclass(frozen=True)
class RunningSumTask:
  """Problems of n steps with n uniform in [min_steps, max_steps]; start in [0, 99], add in [1, 9]."""
  min_steps: int = 8
  max_steps: int = 20
  eval_fraction: float = 0.2

  name: ClassVar[str] = "running_sum"
  format_regex: ClassVar[str] = r"\d\d:\d:\d\d(?:,\d\d:\d:\d\d)*\. answer: \d\d"

  def __post_init__(self):
    if not 1 <= self.min_steps <= self.max_steps <= 99:
      raise ValueError(f"need 1 <= min_steps={self.min_steps} <= max_steps={self.max_steps} <= 99 "
                       f"(the counter is two digits)")
    base.check_eval_fraction(self.eval_fraction)

  def _draw(self, rng: random.Random) -> base.Problem:
    n = rng.randint(self.min_steps, self.max_steps)
    start, add = rng.randint(0, 99), rng.randint(1, 9)
    answer = (start + n * add) % 100
    return base.Problem(state(n, add, start) + ",", str(answer), self.name,
                        meta={"start": start, "add": add, "steps": n})

  def generate(self, n: int, seed: int, split: str = "train", *, unique: bool = True) -> list[base.Problem]:
    tag = f"{self.name}/{self.min_steps}/{self.max_steps}"
    return base.sample_problems(tag, self._draw, n, seed, split, self.eval_fraction, unique)

  def verify(self, response: str, problem: base.Problem) -> float:
    return base.int_score(base.extract_marked_int(response), problem.answer)

  def sft_target(self, problem: base.Problem) -> str:
    m = problem.meta
    return solution(m["start"], m["add"], m["steps"])
