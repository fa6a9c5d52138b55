"""Arithmetic: one-line expressions answered directly, e.g. "23+58=" -> "81".

Difficulty knobs: `digits` (operands are uniform in [0, 10**digits)), `num_ops` (operators per expression), and `ops`
(which of + - * may appear). `*` binds tighter than + and -, as usual; results may be negative.
"""

from __future__ import annotations

import dataclasses
import random
from typing import ClassVar

from exrl.tasks import base

VALID_OPS = "+-*"


def evaluate(operands: list[int], operators: list[str]) -> int:
  """Evaluates a1 o1 a2 o2 ... with * before + and -, left to right otherwise."""
  terms, signs = [operands[0]], ["+"]
  for op, x in zip(operators, operands[1:]):
    if op == "*":
      terms[-1] *= x
    else:
      terms.append(x)
      signs.append(op)
  return sum(t if s == "+" else -t for s, t in zip(signs, terms))


def verify_direct_int(response: str, problem: base.Problem) -> float:
  """1.0 iff the whole stripped response is exactly the reference integer (e.g. "81" or " 81\\n")."""
  return base.int_score(base.parse_int(response), problem.answer)


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
  """Expressions like "23+58=" with the integer answer as the whole completion."""
  digits: int = 2
  num_ops: int = 1
  ops: str = "+"
  eval_fraction: float = 0.2

  name: ClassVar[str] = "arithmetic"
  format_regex: ClassVar[str] = r"-?\d+"

  def __post_init__(self):
    if self.digits < 1:
      raise ValueError(f"digits={self.digits} must be >= 1")
    if self.num_ops < 1:
      raise ValueError(f"num_ops={self.num_ops} must be >= 1")
    if not self.ops or any(o not in VALID_OPS for o in self.ops):
      raise ValueError(f"ops={self.ops!r} must be a non-empty string of operators from {VALID_OPS!r}")
    base.check_eval_fraction(self.eval_fraction)

  def _draw(self, rng: random.Random) -> base.Problem:
    hi = 10**self.digits - 1
    operands = [rng.randint(0, hi) for _ in range(self.num_ops + 1)]
    operators = [rng.choice(self.ops) for _ in range(self.num_ops)]
    prompt = str(operands[0]) + "".join(f"{o}{x}" for o, x in zip(operators, operands[1:])) + "="
    answer = str(evaluate(operands, operators))
    return base.Problem(prompt, answer, self.name, meta={"operands": operands, "operators": operators})

  def generate(self, n: int, seed: int, split: str = "train", *, unique: bool = True) -> list[base.Problem]:
    tag = f"{self.name}/{self.digits}/{self.num_ops}/{self.ops}"
    return base.sample_problems(tag, self._draw, n, seed, split, self.eval_fraction, unique)

  def verify(self, response: str, problem: base.Problem) -> float:
    return verify_direct_int(response, problem)

  def sft_target(self, problem: base.Problem) -> str:
    return problem.answer
