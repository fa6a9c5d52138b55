"""A long-reasoning task whose state fits in a few tokens: a running total written out step by step (Delethink).

  "17+5 57>41:" -> "56:22,55:27,54:32,...,41:97. answer: 97"

Start at 17 and add 5, modulo 100, once per step while a counter runs down from 57 to 41 (n = 16 steps).
Each step writes the counter and the total as two digits each ("56:22,"), so every step is the same few
tokens and the written solution grows linearly with n. The whole state (counter, total) is in the last step
and the stopping rule (counter == 41) and the increment are in the query, so a Markovian thinker that
keeps the query and a short tail of its own text can go on for any n. Counters cover 00..99 even for short
problems (hi is drawn anywhere in [n, 99]), so a model trained on short traces has seen every counter it
meets on long ones.

The verifier reads the integer after the LAST "answer:" and compares it with (start + n * add) mod 100.
"""
from __future__ import annotations

import dataclasses
import random
from typing import ClassVar

from exrl.tasks import base


def solution(start: int, add: int, hi: int, lo: int) -> str:
  """The written solution of "start+add hi>lo:"."""
  steps, total = [], start
  for counter in range(hi - 1, lo - 1, -1):
    total = (total + add) % 100
    steps.append(f"{counter:02d}:{total:02d}")
  return f"{','.join(steps)}. {base.ANSWER_MARKER} {total:02d}"


@dataclasses.dataclass(frozen=True)
class RunningSumTask:
  """Problems of n steps with n uniform in [min_steps, max_steps]; start in [0, 99], add in [1, 9]."""
  min_steps: int = 8
  max_steps: int = 20
  eval_fraction: float = 0.2

  name: ClassVar[str] = "running_sum"
  format_regex: ClassVar[str] = r"\d\d:\d\d(?:,\d\d:\d\d)*\. answer: \d\d"

  def __post_init__(self):
    if not 1 <= self.min_steps <= self.max_steps <= 99:
      raise ValueError(f"need 1 <= min_steps={self.min_steps} <= max_steps={self.max_steps} <= 99 "
                       f"(the counter is two digits)")
    base.check_eval_fraction(self.eval_fraction)

  def _draw(self, rng: random.Random) -> base.Problem:
    n = rng.randint(self.min_steps, self.max_steps)
    start, add, hi = rng.randint(0, 99), rng.randint(1, 9), rng.randint(n, 99)
    answer = (start + n * add) % 100
    return base.Problem(f"{start}+{add} {hi}>{hi - n}:", str(answer), self.name,
                        meta={"start": start, "add": add, "hi": hi, "lo": hi - n, "steps": n})

  def generate(self, n: int, seed: int, split: str = "train", *, unique: bool = True) -> list[base.Problem]:
    tag = f"{self.name}/{self.min_steps}/{self.max_steps}"
    return base.sample_problems(tag, self._draw, n, seed, split, self.eval_fraction, unique)

  def verify(self, response: str, problem: base.Problem) -> float:
    return base.int_score(base.extract_marked_int(response), problem.answer)

  def sft_target(self, problem: base.Problem) -> str:
    m = problem.meta
    return solution(m["start"], m["add"], m["hi"], m["lo"])
