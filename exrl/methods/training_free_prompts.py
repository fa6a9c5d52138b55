"""Training-Free GRPO's prompts (arXiv 2510.08191, rewritten in exrl's words) and robust parsers for the replies.

Three prompts, as in the paper's pipeline: summarise one rollout; from a group's summaries and rewards, state
what the better rollouts did (the semantic advantage, as lessons); turn the batch's lessons into operations on the
experience library. Replies are untrusted text: every parser returns None (or drops an item and counts it)
rather than raising.
"""
from __future__ import annotations

import json
import re
from typing import Any, Sequence

LESSON_HEADER = "Lessons learned from earlier attempts at similar problems (apply those that fit):"

SUMMARY_PROMPT = """You are reviewing one attempt at a problem.

Problem:
{problem}

Attempt:
{attempt}

Outcome: {outcome}

In at most {words} words, describe the approach the attempt took, step by step, and where it went right or wrong.
Write only the description."""

ADVANTAGE_PROMPT = """Several attempts were made at the same problem and each was scored (1 = correct, 0 = wrong).

Problem:
{problem}
{answer}
Attempts, summarised:
{attempts}

Lessons already in the library:
{library}

Compare the better-scored attempts with the worse ones. What did the better ones do that the worse ones did not?
State at most {max_lessons} general, reusable lessons (each one sentence, not specific to these numbers), that are
not already in the library. Reply with JSON only, in this form:
```json
{{"lessons": ["...", "..."]}}
```"""

UPDATE_PROMPT = """You maintain a library of lessons that is shown to a model before it solves problems.

Current library (id: lesson):
{library}

New lessons from the latest batch of attempts:
{lessons}

Decide how the library should change. Each operation is one of:
  {{"op": "add", "text": "..."}}                 a new lesson not covered by the library
  {{"op": "modify", "id": "E3", "text": "..."}}  rewrite an existing lesson to merge or refine it
  {{"op": "delete", "id": "E3"}}                 remove a lesson that is wrong or redundant
  {{"op": "keep", "id": "E3"}}                   leave a lesson as it is (no change)
Keep the library short and general. Reply with a JSON list of operations only:
```json
[{{"op": "add", "text": "..."}}]
```"""

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)
_MAX_STARTS = 32  # candidate openers tried per source: a reply of many brackets must not cost O(n^2)


def policy_prompt(problem: str, library_text: str) -> str:
  """The problem with the library's lessons in front (unchanged when the library is empty)."""
  return f"{LESSON_HEADER}\n{library_text}\n\n{problem}" if library_text else problem


def summary_prompt(problem: str, attempt: str, reward: float, words: int = 120) -> str:
  outcome = f"score {reward:g} ({'correct' if reward >= 1 else 'wrong' if reward <= 0 else 'partly correct'})"
  return SUMMARY_PROMPT.format(problem=problem, attempt=attempt, outcome=outcome, words=words)


def advantage_prompt(problem: str, answer: str | None, summaries: Sequence[tuple[str, float]], library_text: str,
                     max_lessons: int) -> str:
  attempts = "\n".join(f"[attempt {i + 1}, score {r:g}] {s}" for i, (s, r) in enumerate(summaries))
  return ADVANTAGE_PROMPT.format(problem=problem, answer=f"Reference answer: {answer}\n" if answer else "",
                                 attempts=attempts, library=library_text or "(empty)", max_lessons=max_lessons)


def update_prompt(library_text: str, lessons: Sequence[str]) -> str:
  return UPDATE_PROMPT.format(library=library_text or "(empty)", lessons="\n".join(f"- {x}" for x in lessons))


def parse_json(text: str, kind: type) -> Any | None:
  """The first JSON value of type `kind` (dict or list) in a reply: inside ```json fences first, then anywhere.

  Returns None when there is none. Never raises on any string.
  """
  if not isinstance(text, str):
    return None
  decoder = json.JSONDecoder()
  opener = "{" if kind is dict else "["
  for source in [m.group(1) for m in _FENCE.finditer(text)] + [text]:
    starts = [i for i, ch in enumerate(source) if ch == opener][:_MAX_STARTS]
    for i in starts:
      try:
        value, _ = decoder.raw_decode(source, i)
      except (ValueError, RecursionError):
        continue
      if isinstance(value, kind):
        return value
  return None


def _clean(text: Any, max_chars: int) -> str | None:
  """A one-line lesson of 1..max_chars characters, or None."""
  if not isinstance(text, str):
    return None
  line = " ".join(text.split())
  return line if 0 < len(line) <= max_chars else None


def parse_lessons(text: str, max_lessons: int, max_chars: int) -> tuple[list[str] | None, int]:
  """(lessons, items dropped) from an advantage reply; lessons is None when the reply is malformed.

  Accepts {"lessons": [str, ...]}, or a bare [str, ...] when the reply holds no JSON object. Items that are not strings of 1..max_chars characters,
  and items past max_lessons, are dropped and counted.
  """
  value = parse_json(text, dict)
  items = value.get("lessons") if isinstance(value, dict) else parse_json(text, list)
  if not isinstance(items, list):
    return None, 0
  good = [c for c in (_clean(x, max_chars) for x in items) if c is not None]
  dropped = len(items) - len(good) + max(len(good) - max_lessons, 0)
  return good[:max_lessons], dropped


def parse_operations(text: str) -> list[dict] | None:
  """The list of operation dicts in an update reply (unchecked; the library validates each), or None.

  Accepts a bare list or {"operations": [...]}; non-dict items are kept so the library counts them invalid.
  """
  ops = parse_json(text, list)
  if ops is None:
    value = parse_json(text, dict)
    ops = value.get("operations") if isinstance(value, dict) else None
  return ops if isinstance(ops, list) else None
