"""Multi-turn GRPO: a `Collector` that rolls out groups of ReAct episodes in text environments.

Each problem is an `EnvProblem(env, idx)`; it is played `group_size` times (at `cfg.sampling`'s
temperature, `rollout.max_new_tokens` tokens per turn). A row is one whole trajectory, right-padded to
`rollout.max_len` (one compiled train-step shape); `loss_mask` is the agent-token mask, so observation
tokens carry no loss. The reward is the env's final reward (the registry's outcome input: `reward="verifier"`, or a
control); advantages are per group (cfg.advantage).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np

from exrl.models.config import ModelConfig
from exrl.rl import rewards as rewards_lib
from exrl.rollout.multiturn import SUCCESS_THRESHOLD, MultiTurnConfig, rollout
from exrl.train.collect import core
from exrl.train.experience import Experience, score


@dataclasses.dataclass(frozen=True)
class EnvProblem:
  """Instance `idx` of env `env`; `prompt` is unused (problem sources and logs read it)."""
  env: str
  idx: int
  prompt: str = ""


def trajectory_rows(trajs, T: int) -> dict[str, np.ndarray]:
  """Right-padded [R, T] rows (tokens, valid, positions, loss_mask = agent mask, sampler log-probs)."""
  R = len(trajs)
  rows = {"tokens": np.zeros((R, T), np.int32), "valid": np.zeros((R, T), bool),
          "loss_mask": np.zeros((R, T), np.float32), "old_logp": np.zeros((R, T), np.float32)}
  for r, tr in enumerate(trajs):
    n = len(tr.tokens)
    if n > T:
      raise ValueError(f"trajectory of {n} tokens does not fit rows of width {T}; raise rollout.max_len")
    rows["tokens"][r, :n], rows["valid"][r, :n] = tr.tokens, True
    rows["loss_mask"][r, :n], rows["old_logp"][r, :n] = tr.agent_mask, tr.logp
  rows["positions"] = np.maximum(np.cumsum(rows["valid"], 1) - 1, 0).astype(np.int32)
  return rows


_FIXED_SAMPLING = "multi-turn rollouts sample each turn at sampling.temperature (MultiTurnConfig sets the rest)"


class MultiTurnCollector(core.CollectorBase):
  """`collect(params, ref_params, problems, key) -> Experience` for `EnvProblem`s.

  cfg: an `RLConfig`; the fields in `unsupported` raise when set. env_factory(name) -> a fresh Env (in-process
  `exrl.envs.make_env`, or an `EnvClient` for HTTP). An episode is solved (accuracy, success/ENV) when its reward
  exceeds `success_threshold`. Old log-probs are the sampler's (at the sampling temperature), valid for one epoch.
  """

  provides = (rewards_lib.OUTCOME,)
  verifies = False
  unsupported = {
      "inner_epochs": "old log-probs come from the sampler, valid for one inner epoch",
      "sc_annotator": "agent turns carry no self-certainty",
      "sampling.max_new_tokens": "the per-turn budget is MultiTurnConfig.max_new_tokens",
      **{f"sampling.{f}": _FIXED_SAMPLING for f in ("top_k", "top_p", "greedy", "stop_token_ids", "head_dtype",
                                                    "engine", "slots")},
      **{f: "turns are bounded by MultiTurnConfig.max_new_tokens" for f in core.INTERRUPTION},
  }

  def __init__(self, cfg, model_config: ModelConfig, tokenizer, env_factory: Callable, rollout_cfg: MultiTurnConfig,
               *, success_threshold: float = SUCCESS_THRESHOLD):
    core.single_process_only(type(self).__name__)
    super().__init__(cfg, model_config, tokenizer)
    self.env_factory, self.success_threshold = env_factory, success_threshold
    self.rollout_cfg = dataclasses.replace(rollout_cfg, temperature=cfg.sampling.temperature, greedy=False)
    self.envs: dict[str, list] = {}

  def _envs(self, names: Sequence[str]) -> list:
    """Reuse env objects across steps (one per slot); an HTTP env keeps its server session."""
    out, used = [], {}
    for n in names:
      pool = self.envs.setdefault(n, [])
      k = used.get(n, 0)
      if k == len(pool):
        pool.append(self.env_factory(n))
      out.append(pool[k])
      used[n] = k + 1
    return out

  def collect(self, params, ref_params, problems: Sequence[EnvProblem], key: jax.Array) -> Experience:
    cfg, G = self.cfg, self.cfg.group_size
    t0 = time.perf_counter()
    items = [p for p in problems for _ in range(G)]
    trajs = rollout(self.model_config, params, self.tokenizer, self._envs([p.env for p in items]),
                    [p.idx for p in items], key, self.rollout_cfg)
    t_sample = time.perf_counter()
    rows = trajectory_rows(trajs, self.rollout_cfg.max_len)
    agent_BxT = rows["loss_mask"].copy()  # the response tokens: the agent's, before the zero-variance filter
    if self.with_ref:
      scored = jax.device_get(score(self.model_config, params, ref_params, rows["tokens"], rows["valid"],
                                    rows["positions"], agent_BxT > 0, with_ref=True, with_policy=False,
                                    temperature=self.rollout_cfg.temperature, pack_width=cfg.pack_width))
      rows["ref_logp"] = np.asarray(scored["ref_logp"], np.float32)
    else:
      rows["ref_logp"] = rows["old_logp"].copy()
    reward_B = np.asarray([t.reward for t in trajs], np.float32)
    solved_B = (reward_B > self.success_threshold).astype(np.float32)
    stats = core.TraceStats(
        correct_B=solved_B, response_B=agent_BxT.sum(1), outcome_B=reward_B,
        kl_sum_B=core.kl_sum(rows["old_logp"], rows["ref_logp"], agent_BxT) if self.with_ref else None,
        extra_B={"turns": np.asarray([len(t.turns) for t in trajs], np.float64)})
    envs = [t.env for t in trajs]
    for name in sorted(set(envs)):  # NaN where another process holds this env's episodes: the mean skips them
      stats.extra_B[f"success/{name}"] = np.where([e == name for e in envs], solved_B, np.nan)
    inputs = rewards_lib.RewardInputs(group_size=G, key=key, outcome_B=reward_B)
    total_B, adv_B, keep_B, metrics = core.rewards_and_advantages(cfg, inputs, stats)
    rows["loss_mask"] *= keep_B[:, None]
    B = len(items)
    rows.update(adv=adv_B, trace_id=np.arange(B, dtype=np.int32), group_id=(np.arange(B) // G).astype(np.int32))
    traces = {"problem": np.arange(B) // G, "text": [t.text for t in trajs], "reward": total_B,
              "length": agent_BxT.sum(1).astype(np.int64), "env": envs, "idx": [t.idx for t in trajs],
              "turns": [len(t.turns) for t in trajs]}
    timing = {"sample_s": t_sample - t0, "score_s": time.perf_counter() - t_sample}
    return Experience(rows=rows, traces=traces, metrics=metrics, timing=timing)

  def close(self) -> None:
    for pool in self.envs.values():
      for env in pool:
        if hasattr(env, "close"):
          env.close()
    self.envs = {}
