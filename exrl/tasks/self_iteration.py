"""Self-iteration problems (ExIt): prompts that ask the model to improve, or to diverge from, its latest
response, and the improvement reward, as a module-level verifier that runs in the time-bounded pool.

  p = self_iteration_problem(base_problem, history=[["answer: 7*3-5", 0.0]], mode="improve", graded=True)
  p.task == "self_iteration";  verify_improvement("answer: 3*7+5", p) == 1.0

Prompt rule (this is the history truncation rule): a prompt shows the request and ONLY the latest response;
earlier turns of the history never enter the prompt, as in the paper's improve prompt. Reward:
graded quality: max(0, (r_k - r_{k-1}) / (1 - r_{k-1})), and r_k itself when r_{k-1} = 1 (keeping a perfect
answer is still rewarded); binary quality: the verifier's 0/1 for the new response.
"""
from __future__ import annotations

from typing import Any

from exrl.tasks.base import Problem
from exrl.tasks.verifiers import VERIFIERS, get_verifier

TASK_NAME = "self_iteration"
MODES = ("improve", "diverge")
IMPROVE_TEMPLATE = "Improve your current response to this request: {request} Current response: {response} New:"
DIVERGE_TEMPLATE = ("Improve your current response to this request: {request} Current response: {response} "
                    "Summarise its approach, then answer with a SIGNIFICANTLY different approach. New:")


def problem_to_dict(p: Problem) -> dict[str, Any]:
  """JSON form of a problem (meta must be JSON-serialisable: ints, floats, strings, lists, dicts)."""
  return {"prompt": p.prompt, "answer": p.answer, "task": p.task, "solution": p.solution, "meta": dict(p.meta)}


def problem_from_dict(d: dict[str, Any]) -> Problem:
  return Problem(d["prompt"], d["answer"], d.get("task", ""), d.get("solution"), dict(d.get("meta") or {}))


def build_prompt(request: str, response: str, mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; valid: {MODES}")
  template = IMPROVE_TEMPLATE if mode == "improve" else DIVERGE_TEMPLATE
  return template.format(request=request, response=response)


def self_iteration_problem(base: Problem | dict, history, mode: str, graded: bool, *, k: int | None = None,
                           parent_id: int | None = None) -> Problem:
  """The problem "revise the latest response in `history` ([[text, quality], ...], non-empty) to `base`".

  meta carries everything the verifier and the ExIt source need: the base problem (dict), the history,
  prev_score = quality of the latest response, graded, mode, k (iterate index of the new response), parent_id.
  """
  if not history:
    raise ValueError("a self-iteration problem needs a non-empty history (the response to revise)")
  b = base if isinstance(base, dict) else problem_to_dict(base)
  text, prev = history[-1][0], float(history[-1][1])
  meta = {"base": b, "history": [[str(t), float(q)] for t, q in history], "prev_score": prev, "graded": bool(graded),
          "mode": mode, "k": len(history) if k is None else int(k), "parent_id": parent_id}
  return Problem(build_prompt(b["prompt"], text, mode), b["answer"], TASK_NAME, b.get("solution"), meta)


def base_problem(p: Problem) -> Problem:
  """The underlying task problem of a self-iteration problem (itself for a plain one)."""
  return problem_from_dict(p.meta["base"]) if p.task == TASK_NAME else p


def improvement_reward(new: float, prev: float, graded: bool) -> float:
  if not graded:
    return float(new)
  if prev >= 1.0:
    return float(new)
  return max(0.0, (new - prev) / (1.0 - prev))


def base_quality(response: str, problem: Problem) -> float:
  """Quality in [0, 1] of `response` on the base task of `problem` (plain or self-iteration)."""
  b = base_problem(problem)
  return float(get_verifier(b.task)(response, b))


def verify_improvement(response: str, problem: Problem) -> float:
  """The verifier of `self_iteration` problems: the improvement reward of the module docstring."""
  m = problem.meta
  return improvement_reward(base_quality(response, problem), float(m["prev_score"]), bool(m["graded"]))


def tagged_quality(response: str, problem: Problem) -> float:
  """0.5 + 0.5 * base quality: lets a pool caller tell a real quality (>= 0.5) from a failed call (0)."""
  return 0.5 + 0.5 * base_quality(response, problem)


VERIFIERS[TASK_NAME] = verify_improvement  # ExIt improve/diverge steps: reads the base verifier from problem.meta
