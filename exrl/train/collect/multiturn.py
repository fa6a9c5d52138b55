"""Multi-turn GRPO: a `Collector` that rolls out groups of ReAct episodes in text environments.

Each problem is an `EnvProblem(env, idx)`; it is played `group_size` times (at `cfg.sampling`'s
temperature, `rollout.max_new_tokens` tokens per turn). A row is one whole trajectory, right-padded to
`rollout.max_len` (one compiled train-step shape); `loss_mask` is the agent-token mask, so observation
tokens carry no loss. The reward is the env's final reward; advantages are per group (cfg.advantage).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np

from exrl.models.config import ModelConfig
from exrl.rl.advantages import compute_advantages
from exrl.rl.losses import k3_kl
from exrl.rollout.multiturn import MultiTurnConfig, rollout
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


class MultiTurnCollector:
  """`collect(params, ref_params, problems, key) -> Experience` for `EnvProblem`s.

  cfg: an `RLConfig` (group_size, sampling.temperature, advantage, loss.kl_beta, kl_monitor, pack_width are read).
  env_factory(name) -> a fresh Env (in-process `exrl.envs.make_env`, or an `EnvClient` for HTTP).
  Old log-probs are the sampler's (at the sampling temperature), valid for one inner epoch.
  """

  def __init__(self, cfg, model_config: ModelConfig, tokenizer, env_factory: Callable, rollout_cfg: MultiTurnConfig):
    if cfg.inner_epochs != 1:
      raise ValueError(f"MultiTurnCollector supports inner_epochs=1 (old log-probs come from the sampler); "
                       f"got {cfg.inner_epochs}")
    self.cfg, self.model_config, self.tokenizer, self.env_factory = cfg, model_config, tokenizer, env_factory
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
    reward_B = np.asarray([t.reward for t in trajs], np.float32)
    adv_B, keep_B = jax.device_get(compute_advantages(reward_B, cfg.advantage, G))
    rows["loss_mask"] *= np.asarray(keep_B, np.float32)[:, None]
    with_ref = (cfg.loss.kl_beta > 0) or cfg.kl_monitor
    metrics = {}
    if with_ref:
      scored = jax.device_get(score(self.model_config, params, ref_params, rows["tokens"], rows["valid"],
                                    rows["positions"], rows["loss_mask"] > 0, with_ref=True, with_policy=False,
                                    temperature=self.rollout_cfg.temperature, pack_width=cfg.pack_width))
      rows["ref_logp"] = np.asarray(scored["ref_logp"], np.float32)
      m = rows["loss_mask"]
      metrics["kl"] = float((np.asarray(k3_kl(rows["old_logp"], rows["ref_logp"])) * m).sum() / max(m.sum(), 1))
    else:
      rows["ref_logp"] = rows["old_logp"].copy()
    B = len(items)
    rows.update(adv=np.asarray(adv_B, np.float32), trace_id=np.arange(B, dtype=np.int32),
                group_id=(np.arange(B) // G).astype(np.int32))
    lengths = np.asarray([sum(t.agent_mask) for t in trajs])
    traces = {"problem": np.arange(B) // G, "text": [t.text for t in trajs], "reward": reward_B, "length": lengths,
              "env": [t.env for t in trajs], "idx": [t.idx for t in trajs], "turns": [len(t.turns) for t in trajs]}
    metrics.update(reward_mean=float(reward_B.mean()), accuracy=float(np.mean(reward_B > 0.99)),
                   response_len=float(lengths.mean()), turns=float(np.mean(traces["turns"])),
                   zero_var_frac=float(1 - np.mean(keep_B)))
    for name in sorted(set(traces["env"])):
      sel = [t.reward > 0.99 for t in trajs if t.env == name]
      metrics[f"success/{name}"] = float(np.mean(sel))
    timing = {"sample_s": t_sample - t0, "score_s": time.perf_counter() - t_sample}
    return Experience(rows=rows, traces=traces, metrics=metrics, timing=timing)

  def close(self) -> None:
    for pool in self.envs.values():
      for env in pool:
        if hasattr(env, "close"):
          env.close()
    self.envs = {}
