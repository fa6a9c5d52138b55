"""Local GSM8K / MATH style datasets (jsonl, json or parquet), checked with math-verify.

The final answer is extracted from the answer field:
  - GSM8K: the text after the last "####" ("... so 40+2 = 42.\\n#### 42" -> "42"; thousands commas dropped);
  - MATH: the content of the last \\boxed{...} (balanced braces; "\\boxed{\\frac{1}{2}}" -> "\\frac{1}{2}");
  - otherwise the whole field, stripped (a bare answer column).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import threading
from pathlib import Path
from typing import Callable, ClassVar

from exrl.tasks import base

SUFFIXES = (".jsonl", ".json", ".parquet")
_BOXED = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> str | None:
  """The content of the last \\boxed{...} / \\fbox{...} in `text` (nested braces allowed), or None."""
  hits = [(text.rfind(b), b) for b in _BOXED]
  start, cmd = max(hits)
  if start < 0:
    return None
  rest = text[start + len(cmd):]
  body = rest.lstrip()
  if not body.startswith("{"):
    # "\\boxed 5" (no braces) is valid LaTeX for a single token.
    tok = body.split(None, 1)[0].rstrip(".$") if body and rest[:1].isspace() else ""
    return tok or None
  depth = 0
  for j, c in enumerate(body):
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return body[1:j].strip()
  return None  # Unbalanced braces.


def extract_answer(response: str) -> str | None:
  """A model response's final answer for voting: the last \\boxed{} content, else the integer after the last
  "answer:", else the whole response if it is one integer; None if there is none."""
  if not isinstance(response, str) or len(response) > 100_000:
    return None
  boxed = extract_boxed(response)
  if boxed is not None:
    return boxed.replace(" ", "")
  for n in (base.extract_marked_int(response), base.parse_int(response)):
    if n is not None:
      return str(n)
  return None


def extract_final_answer(text: str) -> str:
  """The final answer in a GSM8K or MATH answer field; see the module docstring."""
  text = str(text)
  if "####" in text:
    return text.rsplit("####", 1)[1].strip().replace(",", "")
  boxed = extract_boxed(text)
  if boxed is not None:
    return boxed
  return text.strip()


def _utf8_error(path: Path, e: UnicodeDecodeError, line: int, line_start: int) -> ValueError:
  """Names the file, line (1-based) and byte column of bad UTF-8; `line_start` is the line's byte offset in e.object."""
  bad = e.object[e.start:e.start + 4]
  return ValueError(f"{path}: line {line} is not valid UTF-8 (byte {e.start - line_start + 1} of the line, "
                    f"{bad!r}: {e.reason}); re-encode the file as UTF-8")


def _read_rows(path: Path) -> list[dict]:
  if path.suffix == ".jsonl":
    rows = []
    with path.open("rb") as f:  # bytes, so a decoding error can name its line
      for k, raw in enumerate(f, 1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise _utf8_error(path, e, k, 0) from e
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {k} is not valid JSON ({e})") from e
    return rows
  if path.suffix == ".json":
    raw = path.read_bytes()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      line_start = raw.rfind(b"\n", 0, e.start) + 1
      raise _utf8_error(path, e, raw.count(b"\n", 0, e.start) + 1, line_start) from e
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg})") from e
    if not isinstance(data, list):
      raise ValueError(f"{path}: a .json dataset must hold a list of objects, found {type(data).__name__}")
    return data
  import pyarrow.parquet as pq  # Only needed for parquet.

  return pq.read_table(path).to_pylist()


def load_math_dataset(path: str | os.PathLike, question_field: str = "question", answer_field: str = "answer",
                      *, limit: int | None = None) -> list[base.Problem]:
  """Reads a local dataset file into Problems (task "math"); `solution` keeps the raw answer field.

  Raises FileNotFoundError for a missing file, ValueError for an unknown suffix, a row that is not an object, a missing
  field (naming the available ones), or an answer field with no extractable answer.
  """
  p = Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"dataset file {str(p)!r} does not exist")
  if p.suffix not in SUFFIXES:
    raise ValueError(f"dataset file {str(p)!r} has suffix {p.suffix!r}; supported: {SUFFIXES}")
  rows = _read_rows(p)
  if not rows:
    raise ValueError(f"dataset file {str(p)!r} holds no rows")
  out = []
  for k, row in enumerate(rows[:limit] if limit is not None else rows):
    if not isinstance(row, dict):
      raise ValueError(f"{p}: row {k} is a {type(row).__name__}, expected an object with fields")
    for field in (question_field, answer_field):
      if field not in row:
        raise ValueError(f"{p}: row {k} has no field {field!r}; available fields: {sorted(row)}. "
                         "Pass question_field= / answer_field= to name the right ones")
    raw = str(row[answer_field])
    answer = extract_final_answer(raw)
    if not answer:
      raise ValueError(f"{p}: row {k} has an empty final answer in field {answer_field!r}: {raw[:200]!r}")
    out.append(base.Problem(str(row[question_field]), answer, MathDatasetTask.name, solution=raw,
                            meta={"row": k}))
  return out


def drop_long_prompts(problems: list[base.Problem], count_tokens: Callable[[str], int], max_prompt_tokens: int,
                      source: str = "the dataset") -> tuple[list[base.Problem], int]:
  """(problems whose prompt has <= max_prompt_tokens tokens, number dropped).

  Raises ValueError for max_prompt_tokens < 1, and when every problem is dropped: then the message names the
  shortest prompt's length, the value that would keep at least one problem (not "the dataset is empty").
  """
  if max_prompt_tokens < 1:
    raise ValueError(f"max_prompt_tokens={max_prompt_tokens} must be >= 1")
  lengths = [count_tokens(p.prompt) for p in problems]
  kept = [p for p, n in zip(problems, lengths) if n <= max_prompt_tokens]
  if problems and not kept:
    raise ValueError(f"all {len(problems)} problems of {source} are longer than max_prompt_tokens={max_prompt_tokens} "
                     f"(the shortest prompt has {min(lengths)} tokens); raise --max-prompt-tokens to at least "
                     f"{min(lengths)}")
  return kept, len(problems) - len(kept)


def verify_math(response: str, problem: base.Problem) -> float:
  """1.0 iff math-verify finds the response's answer equal to the reference answer, else 0.0.

  math-verify's own timeouts use SIGALRM, which only works on the main thread; elsewhere they are off and the caller
  must bound the time (the pool in `exrl.tasks.pool` always does).
  """
  from math_verify import parse, verify  # sympy-heavy; import lazily.

  if not isinstance(response, str) or not response.strip():
    return 0.0
  t = 5 if threading.current_thread() is threading.main_thread() else None
  gold = parse(f"${problem.answer}$", parsing_timeout=t) or parse(problem.answer, parsing_timeout=t)
  if not gold:
    # The reference cannot be parsed as math (e.g. free text): fall back to an exact string match of the answer.
    return float(extract_final_answer(response) == problem.answer)
  pred = parse(response, parsing_timeout=t)
  if not pred:
    return 0.0
  return float(verify(gold, pred, timeout_seconds=t))


@functools.lru_cache(maxsize=8)
def _cached_problems(path: str, question_field: str, answer_field: str, mtime: float) -> tuple[base.Problem, ...]:
  del mtime  # Part of the cache key only: a rewritten file is re-read.
  return tuple(load_math_dataset(path, question_field, answer_field))


@dataclasses.dataclass(frozen=True)
class MathDatasetTask:
  """A local dataset behind the Task protocol. Rows are split into train/eval by the hash of the question.

  The problems are loaded lazily and cached per process, so the task object itself stays small to pickle.
  """
  path: str
  question_field: str = "question"
  answer_field: str = "answer"
  eval_fraction: float = 0.1

  name: ClassVar[str] = "math"
  # Any response with a \boxed{} answer or an "answer:" line is well formed.
  format_regex: ClassVar[str] = r"(?s).*(\\boxed\{.+\}|answer:\s*\S+).*"

  def __post_init__(self):
    base.check_eval_fraction(self.eval_fraction)
    if not Path(self.path).is_file():
      raise FileNotFoundError(f"dataset file {self.path!r} does not exist")

  def problems(self, split: str | None = None) -> list[base.Problem]:
    """All problems, or those of one split, in file order."""
    ps = _cached_problems(str(self.path), self.question_field, self.answer_field, os.path.getmtime(self.path))
    if split is None:
      return list(ps)
    base.check_split(split)
    return [p for p in ps if base.in_eval_split(p.prompt, self.eval_fraction) == (split == "eval")]

  def generate(self, n: int, seed: int, split: str = "train", *, unique: bool = True) -> list[base.Problem]:
    """n problems of `split`, shuffled by `seed`; with `unique`, n may not exceed the split's size."""
    pool = self.problems(split)
    if not pool:
      raise ValueError(f"dataset {self.path!r} has no {split} problems (eval_fraction={self.eval_fraction})")
    rng = random.Random(f"{self.name}|{split}|{seed}")
    if unique:
      if n > len(pool):
        raise ValueError(f"asked for n={n} distinct {split} problems but dataset {self.path!r} has {len(pool)}; "
                         "lower n or pass unique=False")
      return rng.sample(pool, n)
    return [rng.choice(pool) for _ in range(n)]

  def verify(self, response: str, problem: base.Problem) -> float:
    return verify_math(response, problem)

  def sft_target(self, problem: base.Problem) -> str:
    return problem.solution if problem.solution else f"\\boxed{{{problem.answer}}}"
