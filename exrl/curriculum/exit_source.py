"""The ExIt autocurriculum as a `ProblemSource`: base tasks mixed with self-iteration steps drawn from a
prioritised buffer of the model's own partial histories (ExIt, arXiv 2509.04575).

  source = ExItSource(TaskSource(get_task("countdown")), ExItConfig(), count_tokens=lambda s: len(encode(s)))
  train_rl(cfg, model_config, params, tokenizer, source)     # verify=None: rewards by problem.task

batch(step, n): for each slot, with probability p (once the buffer holds min_size instances) an instance is
drawn with P ∝ exp(κ S); a random turn prefix of its history becomes a self-iteration problem at iterate
k'+1: a divergence step with probability p_div, else an improve step (exrl.tasks.self_iteration). Otherwise
the slot takes the step's base task.
update(problems, experience): S = variance of each group's rewards (rewards are in [0, 1]). Each distinct
response of the group becomes a child instance (history + [response, its base quality]) that inherits S;
the parent instance, if it was drawn whole, is re-scored to S.

Ablation switches: improve=False keeps base tasks only in the buffer (a learnability curriculum over base
tasks: "+ curriculum"); p_div=0 turns divergence off; p=0 is plain GRPO on base tasks.

Bad input, skipped and counted (never raised):
  - a group in which any response's base verifier raised or timed out (`exit/skipped_verifier`): nothing
    from it enters the buffer;
  - a child whose longest self-iteration prompt (the diverge template) is over `prompt_budget` tokens
    (`exit/skipped_budget`); at draw time an over-budget prompt falls back to the base task.
History truncation rule: prompts show the request and only the latest response; a stored history keeps its
most recent `max_turns` turns (older ones are dropped; the instance's k still counts them).
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable, Sequence

import numpy as np

from exrl.curriculum.buffer import TaskBuffer
from exrl.infra.rng import host_rng_state, set_host_rng_state
from exrl.tasks import pool as pool_lib
from exrl.tasks import self_iteration as si
from exrl.tasks.base import Problem


@dataclasses.dataclass(frozen=True)
class ExItConfig:
  """Defaults follow the paper's math setting scaled down for CPU runs (paper: N=512, B_min=128)."""
  capacity: int = 512  # N
  min_size: int = 32  # B_min: nothing is drawn from the buffer before it holds this many
  p: float = 0.5  # probability of drawing from the buffer (base tasks: 1 - p)
  p_div: float = 0.2  # probability that a buffer step is a divergence step
  kappa: float = 10.0  # P ∝ exp(κ S), S in [0, 0.25]
  improve: bool = True  # False: the buffer re-serves base tasks only (the "+ curriculum" ablation)
  graded: bool = True  # improvement reward max(0, (r_k - r_{k-1}) / (1 - r_{k-1})); False: verifier 0/1
  max_turns: int = 8  # a stored history keeps at most this many recent turns
  prompt_budget: int = 256  # tokens (by `count_tokens`) a self-iteration prompt may take
  seed: int = 0

  def __post_init__(self):
    for name in ("p", "p_div"):
      v = getattr(self, name)
      if not 0.0 <= v <= 1.0:
        raise ValueError(f"ExItConfig.{name}={v} must be in [0, 1]")
    if self.capacity < 1 or not 0 <= self.min_size <= self.capacity:
      raise ValueError(f"ExItConfig needs capacity >= 1 and 0 <= min_size <= capacity; got capacity="
                       f"{self.capacity}, min_size={self.min_size}")
    if self.max_turns < 1 or self.prompt_budget < 1:
      raise ValueError(f"ExItConfig.max_turns={self.max_turns} and prompt_budget={self.prompt_budget} must be >= 1")


COUNTERS = ("from_buffer", "from_base", "diverge", "skipped_verifier", "skipped_budget", "children_inserted",
            "children_rejected")


class ExItSource:
  """See the module docstring. `base` is a stateless `ProblemSource` of base tasks (e.g. `TaskSource`).

  count_tokens: prompt text -> length in tokens, for `prompt_budget` (default: characters).
  pool: where base-quality calls run under the verifier timeout (default: the process-wide pool).
  """

  def __init__(self, base, cfg: ExItConfig = ExItConfig(), *, count_tokens: Callable[[str], int] = len,
               pool: pool_lib.VerifierPool | None = None):
    self.base, self.cfg, self.count_tokens, self.pool = base, cfg, count_tokens, pool
    self.buffer = TaskBuffer(cfg.capacity, cfg.kappa, seed=cfg.seed)
    self.rng = random.Random(f"exit-source|{cfg.seed}")
    self.counts = {k: 0 for k in COUNTERS}

  # ---- drawing ------------------------------------------------------------------------------------

  def batch(self, step: int, n: int) -> list[Problem]:
    base = self.base.batch(step, n)
    out = []
    for i in range(n):
      use_buffer = len(self.buffer) >= max(self.cfg.min_size, 1) and self.rng.random() < self.cfg.p
      p = self._from_buffer() if use_buffer else None
      if p is None:
        self.counts["from_base"] += 1
        p = base[i]
      else:
        self.counts["from_buffer"] += 1
      out.append(p)
    return out

  def _from_buffer(self) -> Problem | None:
    e = self.buffer.sample()
    b = e["problem"]
    if not self.cfg.improve:  # "+ curriculum": re-serve the base task; update() re-scores this entry
      p = si.problem_from_dict(b)
      return dataclasses.replace(p, meta={**p.meta, "buffer_id": e["id"]})
    h = e["history"]
    cut = self.rng.randint(1, len(h))  # a random turn prefix; the new response is iterate k' + 1
    full = cut == len(h)
    k = e["k"] - (len(h) - cut)
    diverge = self.rng.random() < self.cfg.p_div
    mode = "diverge" if diverge else "improve"
    p = si.self_iteration_problem(b, h[:cut], mode, self.cfg.graded, k=k, parent_id=e["id"] if full else None)
    if self.count_tokens(p.prompt) > self.cfg.prompt_budget:
      self.counts["skipped_budget"] += 1
      return None
    self.counts["diverge"] += int(diverge)
    return p

  # ---- feedback -----------------------------------------------------------------------------------

  def update(self, problems: Sequence[Problem], experience) -> None:
    if self.cfg.p == 0.0:  # plain GRPO: nothing is ever drawn, so nothing is stored
      if hasattr(experience, "metrics"):
        experience.metrics.update(self.stats())
      return
    tr = experience.traces
    prob_idx = np.asarray(tr["problem"])
    rewards = np.asarray(tr["reward"], np.float64)
    texts = list(tr["text"])
    quality = self._qualities(texts, [problems[int(j)] for j in prob_idx]) if self.cfg.improve else None
    for j, p in enumerate(problems):
      idx = np.flatnonzero(prob_idx == j)
      if len(idx) == 0:
        continue
      if quality is not None and np.any(np.isnan(quality[idx])):
        self.counts["skipped_verifier"] += 1
        continue
      score = float(np.var(rewards[idx]))
      parent_id = p.meta.get("parent_id") if p.task == si.TASK_NAME else None
      if not self.cfg.improve:
        children = [] if p.meta.get("buffer_id") is not None else [(si.problem_to_dict(p), [], 0)]
        ids = self.buffer.record_group(p.meta.get("buffer_id"), score, children)
      else:
        ids = self.buffer.record_group(parent_id, score, self._children(p, idx, texts, quality))
      self.counts["children_inserted"] += sum(i is not None for i in ids)
      self.counts["children_rejected"] += sum(i is None for i in ids)
    if hasattr(experience, "metrics"):
      experience.metrics.update(self.stats())

  def _qualities(self, texts: list[str], problems: list[Problem]) -> np.ndarray:
    """Base-task quality of each response, NaN where the verifier raised or timed out."""
    pool = self.pool or pool_lib.default_pool()
    tagged, _ = pool.map(si.tagged_quality, list(zip(texts, problems)))
    tagged = np.asarray(tagged, np.float64)
    return np.where(tagged >= 0.5, 2.0 * tagged - 1.0, np.nan)

  def _children(self, p: Problem, idx: np.ndarray, texts: list[str], quality: np.ndarray) -> list[tuple]:
    if p.task == si.TASK_NAME:
      base, history, k = p.meta["base"], p.meta["history"], int(p.meta["k"])
    else:
      base, history, k = si.problem_to_dict(p), [], 0
    out, seen = [], set()
    for t in idx:
      if texts[t] in seen:
        continue
      seen.add(texts[t])
      h = (list(history) + [[texts[t], float(quality[t])]])[-self.cfg.max_turns:]
      longest = si.build_prompt(base["prompt"], texts[t], "diverge")
      if self.count_tokens(longest) > self.cfg.prompt_budget:
        self.counts["skipped_budget"] += 1
        continue
      out.append((base, h, k + 1))
    return out

  # ---- state --------------------------------------------------------------------------------------

  def stats(self) -> dict[str, float]:
    return {**{f"exit/{k}": float(v) for k, v in self.counts.items()},
            **{f"exit/{k}": v for k, v in self.buffer.stats().items()}}

  def state_dict(self) -> dict:
    return {"kind": "exit", "config": dataclasses.asdict(self.cfg), "base": self.base.state_dict(),
            "buffer": self.buffer.state_dict(), "rng": host_rng_state(self.rng), "counts": dict(self.counts)}

  def load_state_dict(self, state: dict) -> None:
    mine = dataclasses.asdict(self.cfg)
    if state.get("kind") != "exit" or state["config"] != mine:
      raise ValueError(f"the checkpoint was written with ExIt source config {state.get('config')}, this run uses "
                       f"{mine}; resume with the same config, or start a new run_dir")
    self.base.load_state_dict(state["base"])
    self.buffer.load_state_dict(state["buffer"])
    set_host_rng_state(self.rng, state["rng"])
    self.counts = dict(state["counts"])
