"""Countdown: reach a target with given numbers and + - * / (graded quality, so revising an answer helps).

  "make 26 from 3 7 5:" -> "answer: 3*7+5"

The response's expression is the text after the LAST "answer:". It must use each given number exactly once
(as a multiset; any order, parentheses allowed) and only + - * / ( ); division is exact (fractions).
Score: 1.0 for the exact target; else max(0, 1 - |value - target| / tolerance), so an answer off by 1 scores
0.9 at the default tolerance 10; 0.0 for an unparsable expression, wrong numbers, or division by zero.
"""

from __future__ import annotations

import dataclasses
import random
import re
from fractions import Fraction
from typing import ClassVar

from exrl.tasks import base

# Untrusted model output: long expressions are rejected before parsing (the parser is linear, this bounds it).
MAX_EXPR_CHARS = 64
_TOKEN_RE = re.compile(r"\s*(\d{1,6}|[-+*/()])")


def _tokens(expr: str) -> list[str] | None:
  out, i = [], 0
  expr = expr.rstrip()
  while i < len(expr):
    m = _TOKEN_RE.match(expr, i)
    if not m:
      return None
    out.append(m.group(1))
    i = m.end()
  return out


def evaluate_expression(expr: str) -> tuple[Fraction, list[int]] | None:
  """(exact value, numbers used) of an arithmetic expression with + - * / ( ), or None if invalid.

  Standard precedence, left-associative; no unary minus (Countdown has none). Division by zero is invalid.
  """
  if len(expr) > MAX_EXPR_CHARS:
    return None
  toks = _tokens(expr)
  if not toks:
    return None
  pos, used = 0, []

  def atom():
    nonlocal pos
    if pos >= len(toks):
      raise ValueError
    t = toks[pos]
    pos += 1
    if t == "(":
      v = add()
      if pos >= len(toks) or toks[pos] != ")":
        raise ValueError
      pos += 1
      return v
    if t.isdigit():
      used.append(int(t))
      return Fraction(int(t))
    raise ValueError

  def mul():
    nonlocal pos
    v = atom()
    while pos < len(toks) and toks[pos] in "*/":
      op = toks[pos]
      pos += 1
      r = atom()
      if op == "/" and r == 0:
        raise ZeroDivisionError
      v = v * r if op == "*" else v / r
    return v

  def add():
    nonlocal pos
    v = mul()
    while pos < len(toks) and toks[pos] in "+-":
      op = toks[pos]
      pos += 1
      r = mul()
      v = v + r if op == "+" else v - r
    return v

  try:
    value = add()
  except (ValueError, ZeroDivisionError):
    return None
  if pos != len(toks):
    return None
  return value, used


def countdown_score(response: str, numbers, target: int, tolerance: float) -> float:
  """Quality in [0, 1] of `response` for reaching `target` from `numbers` (see the module docstring)."""
  if not isinstance(response, str):
    return 0.0
  i = response.lower().rfind(base.ANSWER_MARKER)
  if i < 0:
    return 0.0
  expr = response[i + len(base.ANSWER_MARKER):].strip()
  if expr.endswith("."):
    expr = expr[:-1]
  parsed = evaluate_expression(expr)
  if parsed is None:
    return 0.0
  value, used = parsed
  if sorted(used) != sorted(int(x) for x in numbers):
    return 0.0
  if value == target:
    return 1.0
  return max(0.0, 1.0 - float(abs(value - target)) / tolerance)


def verify_countdown(response: str, problem: base.Problem) -> float:
  """Module-level verifier (picklable for the pool): reads numbers, target and tolerance from problem.meta."""
  m = problem.meta
  return countdown_score(response, m["numbers"], int(problem.answer), float(m.get("tolerance", 10.0)))


@dataclasses.dataclass(frozen=True)
class CountdownTask:
  """`num_numbers` numbers in [1, max_number]; the target is a + - * combination of all of them in [1, max_target]."""
  num_numbers: int = 3
  max_number: int = 9
  max_target: int = 99
  ops: str = "+-*"
  tolerance: float = 10.0
  eval_fraction: float = 0.2

  name: ClassVar[str] = "countdown"
  format_regex: ClassVar[str] = r"answer: [\d+\-*/() ]+"

  def __post_init__(self):
    if self.num_numbers < 2:
      raise ValueError(f"num_numbers={self.num_numbers} must be >= 2")
    if self.max_number < 1 or self.max_target < 1:
      raise ValueError(f"max_number={self.max_number} and max_target={self.max_target} must be >= 1")
    if not self.ops or any(o not in "+-*" for o in self.ops):
      raise ValueError(f"ops={self.ops!r} must be a non-empty string of operators from '+-*'")
    if not self.tolerance > 0:
      raise ValueError(f"tolerance={self.tolerance} must be > 0")
    base.check_eval_fraction(self.eval_fraction)

  def _draw(self, rng: random.Random) -> base.Problem:
    while True:
      numbers = [rng.randint(1, self.max_number) for _ in range(self.num_numbers)]
      order = rng.sample(numbers, len(numbers))
      expr = str(order[0]) + "".join(f"{rng.choice(self.ops)}{x}" for x in order[1:])
      target = evaluate_expression(expr)[0]
      if 1 <= target <= self.max_target:
        break
    prompt = f"make {int(target)} from {' '.join(map(str, sorted(numbers)))}:"
    return base.Problem(prompt, str(int(target)), self.name, solution=expr,
                        meta={"numbers": sorted(numbers), "tolerance": self.tolerance})

  def generate(self, n: int, seed: int, split: str = "train", *, unique: bool = True) -> list[base.Problem]:
    tag = f"{self.name}/{self.num_numbers}/{self.max_number}/{self.max_target}/{self.ops}"
    return base.sample_problems(tag, self._draw, n, seed, split, self.eval_fraction, unique)

  def verify(self, response: str, problem: base.Problem) -> float:
    return verify_countdown(response, problem)

  def sft_target(self, problem: base.Problem) -> str:
    return f"{base.ANSWER_MARKER} {problem.solution}"
