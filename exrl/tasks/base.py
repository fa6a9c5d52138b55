"""The Problem record, the Task protocol, and helpers shared by the built-in tasks.

Train/eval split: a problem belongs to the eval split iff a stable hash (crc32) of its prompt falls in the first
`eval_fraction` of the hash range. Membership depends on the prompt alone, never on the seed, so no eval problem can
ever be generated for training, whatever seeds the two sides use.
"""

from __future__ import annotations

import dataclasses
import random
import re
import zlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

SPLITS = ("train", "eval")
ANSWER_MARKER = "answer:"
# Integers longer than this are not parsed: model output is untrusted, and int() on huge strings is slow.
MAX_INT_DIGITS = 64
_INT_RE = re.compile(r"[+-]?\d{1,%d}" % MAX_INT_DIGITS)


@dataclasses.dataclass(frozen=True)
class Problem:
  """One prompt with its reference answer.

  prompt: the text the model is conditioned on, e.g. "23+58=".
  answer: the final answer as a string, e.g. "81" (for datasets: the extracted final answer, e.g. "42" or "\\frac{1}{2}").
  task: the registry name of the task that made it, so rewards can find its verifier.
  solution: a worked solution when one is known (dataset rationale), else None.
  meta: free-form extras (operands, source row); not part of equality.
  """
  prompt: str
  answer: str
  task: str = ""
  solution: str | None = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)


@runtime_checkable
class Task(Protocol):
  """A family of problems with a verifier.

  name: registry name.
  format_regex: a regex the whole (stripped) well-formed response matches; used by the format reward.
  generate(n, seed, split): n problems, deterministic in (n, seed, split, task options); eval and train are disjoint.
  verify(response, problem): a score in [0, 1].
  sft_target(problem): the completion a teacher would write after `problem.prompt` (SFT warm-start).
  """
  name: str
  format_regex: str

  def generate(self, n: int, seed: int, split: str = "train", *, unique: bool = True) -> list[Problem]: ...
  def verify(self, response: str, problem: Problem) -> float: ...
  def sft_target(self, problem: Problem) -> str: ...


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not a valid split; use one of {SPLITS}")


def in_eval_split(prompt: str, eval_fraction: float) -> bool:
  """Whether `prompt` belongs to the eval split (stable across processes, seeds and python versions)."""
  return zlib.crc32(prompt.encode("utf-8")) < eval_fraction * 2**32


def check_eval_fraction(eval_fraction: float) -> None:
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1) so both splits are non-empty")


def sample_problems(name: str, draw: Callable[[random.Random], Problem], n: int, seed: int, split: str,
                    eval_fraction: float, unique: bool) -> list[Problem]:
  """Rejection-samples `n` problems of one split from `draw`, deterministically in (name, seed, split).

  With `unique`, no prompt repeats; a problem space too small for `n` raises instead of looping forever.
  """
  check_split(split)
  check_eval_fraction(eval_fraction)
  if n < 0:
    raise ValueError(f"n={n} must be >= 0")
  # A string seed is hashed with sha512 by `random`, so it is stable across runs (unlike hash()).
  rng = random.Random(f"{name}|{split}|{seed}")
  want_eval = split == "eval"
  out, seen = [], set()
  max_draws = 200 * n + 10_000
  for _ in range(max_draws):
    if len(out) == n:
      return out
    p = draw(rng)
    if in_eval_split(p.prompt, eval_fraction) != want_eval or (unique and p.prompt in seen):
      continue
    seen.add(p.prompt)
    out.append(p)
  if len(out) == n:
    return out
  raise ValueError(
      f"task {name!r}: found only {len(out)} distinct {split} problems of the n={n} asked for after {max_draws} "
      f"draws; the problem space is too small. Raise the difficulty (more digits / operations), lower n, or pass "
      f"unique=False")


def parse_int(text: str) -> int | None:
  """The integer that `text` is, after stripping whitespace and one trailing '.'; None if it is not one."""
  if not isinstance(text, str):
    return None
  t = text.strip()
  if t.endswith("."):
    t = t[:-1].rstrip()
  if not _INT_RE.fullmatch(t):
    return None
  return int(t)


def extract_marked_int(response: str, marker: str = ANSWER_MARKER) -> int | None:
  """The integer after the LAST `marker` (case-insensitive) in `response`, or None.

  Everything after the marker, stripped (and one trailing '.'), must be exactly one integer.
  """
  if not isinstance(response, str):
    return None
  i = response.lower().rfind(marker.lower())
  if i < 0:
    return None
  return parse_int(response[i + len(marker):])


def int_score(pred: int | None, answer: str) -> float:
  """1.0 for an exact integer match with `answer`, else 0.0."""
  gold = parse_int(answer)
  if gold is None:
    raise ValueError(f"reference answer {answer!r} is not an integer; this task's problems must have integer answers")
  return float(pred is not None and pred == gold)


def scratchpad(start: int, steps: list[tuple[str, int]]) -> tuple[str, int]:
  """Writes a left-to-right running total: start=7, steps=[('+',5),('+',9)] -> ("7+5=12,12+9=21", 21)."""
  parts, acc = [], start
  for op, x in steps:
    new = acc + x if op == "+" else acc - x
    parts.append(f"{acc}{op}{x}={new}")
    acc = new
  return ",".join(parts), acc
