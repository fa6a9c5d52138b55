"""Tasks solved with a short written scratchpad of running totals, ending in "answer: <int>".

chain_sum (in-domain): "7+5+9+3=" -> "7+5=12,12+9=21,21+3=24. answer: 24"
digit_sum (held-out family for out-of-domain eval): "sum digits 4821=" -> "4+8=12,12+2=14,14+1=15. answer: 15"

Both verifiers read the integer after the LAST "answer:" (see `base.extract_marked_int`), so a wrong scratchpad with a
right final answer still scores 1: the reward checks the answer, the format reward checks the shape.
"""

from __future__ import annotations

import dataclasses
import random
from typing import ClassVar

from exrl.tasks import base

# One running-total step, e.g. "12+9=21"; the whole well-formed response is steps joined by "," then the answer.
_STEP = r"-?\d+[+\-]\d+=-?\d+"
SCRATCHPAD_REGEX = rf"{_STEP}(?:,{_STEP})*\. answer: -?\d+"


def verify_marked_int(response: str, problem: base.Problem) -> float:
  """1.0 iff the integer after the last "answer:" equals the reference answer."""
  return base.int_score(base.extract_marked_int(response), problem.answer)


def _target(problem: base.Problem) -> str:
  pad, total = base.scratchpad(problem.meta["start"], problem.meta["steps"])
  assert str(total) == problem.answer, (problem, total)
  return f"{pad}. {base.ANSWER_MARKER} {total}"


@dataclasses.dataclass(frozen=True)
class ChainSumTask:
  """Sums of `num_terms` operands with `digits` digits each; `ops` may include "-" (evaluated left to right)."""
  num_terms: int = 4
  digits: int = 1
  ops: str = "+"
  eval_fraction: float = 0.2

  name: ClassVar[str] = "chain_sum"
  format_regex: ClassVar[str] = SCRATCHPAD_REGEX

  def __post_init__(self):
    if self.num_terms < 2:
      raise ValueError(f"num_terms={self.num_terms} must be >= 2")
    if self.digits < 1:
      raise ValueError(f"digits={self.digits} must be >= 1")
    if not self.ops or any(o not in "+-" for o in self.ops):
      raise ValueError(f"ops={self.ops!r} must be a non-empty string of operators from '+-'")
    base.check_eval_fraction(self.eval_fraction)

  def _draw(self, rng: random.Random) -> base.Problem:
    hi = 10**self.digits - 1
    xs = [rng.randint(0, hi) for _ in range(self.num_terms)]
    steps = [(rng.choice(self.ops), x) for x in xs[1:]]
    prompt = str(xs[0]) + "".join(f"{o}{x}" for o, x in steps) + "="
    _, total = base.scratchpad(xs[0], steps)
    return base.Problem(prompt, str(total), self.name, meta={"start": xs[0], "steps": steps})

  def generate(self, n: int, seed: int, split: str = "train", *, unique: bool = True) -> list[base.Problem]:
    tag = f"{self.name}/{self.num_terms}/{self.digits}/{self.ops}"
    return base.sample_problems(tag, self._draw, n, seed, split, self.eval_fraction, unique)

  def verify(self, response: str, problem: base.Problem) -> float:
    return verify_marked_int(response, problem)

  def sft_target(self, problem: base.Problem) -> str:
    return _target(problem)


@dataclasses.dataclass(frozen=True)
class DigitSumTask:
  """The sum of the decimal digits of an integer with exactly `digits` digits: "sum digits 4821=" -> 15.

  A different prompt format and source of operands from chain_sum, but the same scratchpad skill: a held-out family.
  """
  digits: int = 4
  eval_fraction: float = 0.2

  name: ClassVar[str] = "digit_sum"
  format_regex: ClassVar[str] = SCRATCHPAD_REGEX
  prefix: ClassVar[str] = "sum digits "

  def __post_init__(self):
    if self.digits < 2:
      raise ValueError(f"digits={self.digits} must be >= 2 (a scratchpad needs at least one addition)")
    base.check_eval_fraction(self.eval_fraction)

  def _draw(self, rng: random.Random) -> base.Problem:
    n = rng.randint(10 ** (self.digits - 1), 10**self.digits - 1)
    ds = [int(c) for c in str(n)]
    steps = [("+", d) for d in ds[1:]]
    return base.Problem(f"{self.prefix}{n}=", str(sum(ds)), self.name, meta={"start": ds[0], "steps": steps})

  def generate(self, n: int, seed: int, split: str = "train", *, unique: bool = True) -> list[base.Problem]:
    return base.sample_problems(f"{self.name}/{self.digits}", self._draw, n, seed, split, self.eval_fraction, unique)

  def verify(self, response: str, problem: base.Problem) -> float:
    return verify_marked_int(response, problem)

  def sft_target(self, problem: base.Problem) -> str:
    return _target(problem)
