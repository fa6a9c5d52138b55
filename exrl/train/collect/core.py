"""The collectors' shared core: the decisions every collector makes, made once, here.

- `needs_reference(cfg)`: the frozen reference is scored when the loss takes a k3 KL from per-token log-probs, when
  self-certainty is annotated offline by the reference, or when the KL is monitored (`kl_monitor`). The exact-KL
  estimator needs no collector pass: the train step reads the reference's logits itself.
- Token sets: every token-averaged metric (`kl`, `sample_entropy`) averages over the trace's *response tokens*, the
  tokens the policy generated (a completion; every Delethink chunk's generated part; an agent's turns), whatever the
  zero-variance filter later does to the loss mask. `response_len` is the per-trace count of those tokens, averaged
  over traces. Sums are taken per trace, rounded to float32 and then summed over traces in float64, so a
  multi-host run that gathers the per-trace sums computes exactly the numbers one host does.
- Rewards come from the registry `exrl.rl.rewards.REWARDS`, fed with what the collector provides.
- A collector lists the `RLConfig` fields it cannot honour; one set away from its default raises at construction,
  naming the field, and so does a reward that needs an input the collector does not provide.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import numpy as np

from exrl.infra import distributed
from exrl.models.config import ModelConfig
from exrl.rl import rewards as rewards_lib
from exrl.rl.advantages import compute_advantages
from exrl.rl.losses import k3_kl
from exrl.rollout.sampler import with_interrupt_tokens
from exrl.tasks import pool as pool_lib


def needs_reference(cfg) -> bool:
  """Whether a collector must score the frozen reference (see the module docstring)."""
  return ((cfg.loss.kl_beta > 0 and cfg.loss.kl_estimator == "k3") or cfg.sc_annotator == "offline"
          or cfg.kl_monitor)


def _get(cfg, dotted: str):
  return functools.reduce(getattr, dotted.split("."), cfg)


# ScaleRL's length interruption lives in the single-completion engines; chunked and multi-turn rollouts have their own
# budgets.
INTERRUPTION = ("sampling.think_budget", "sampling.interrupt_text", "sampling.interrupt_token_ids",
                "sampling.answer_budget")


def check_config(cfg, collector: str, unsupported: dict[str, str], provides: Sequence[str]) -> None:
  """Raise a one-line ValueError for an `RLConfig` field the collector cannot honour.

  unsupported: dotted field name -> why (or what to set instead); a field equal to `RLConfig()`'s default passes.
  provides: the reward inputs (`exrl.rl.rewards.INPUTS`) the collector computes; the reward must need no other.
  """
  default = type(cfg)()
  for field, why in unsupported.items():
    value, want = _get(cfg, field), _get(default, field)
    if value != want:
      raise ValueError(f"{collector} does not support RLConfig.{field}={value!r} (leave it at {want!r}): {why}")
  reward = rewards_lib.REWARDS[cfg.reward]
  missing = [n for n in reward.needs if n not in provides]
  if missing:
    valid = tuple(k for k, r in rewards_lib.REWARDS.items() if set(r.needs) <= set(provides))
    raise ValueError(f"{collector} cannot compute RLConfig.reward={cfg.reward!r}, which needs {missing}; "
                     f"valid here: {valid}")


class CollectorBase:
  """What every collector holds: the config (checked), the model, the tokenizer, prompt encoding, and (for those that
  verify) a verifier pool. Subclasses set `provides` and `unsupported` and implement `collect`."""

  provides: tuple[str, ...] = ()
  unsupported: dict[str, str] = {}
  verifies: bool = True

  def __init__(self, cfg, model_config: ModelConfig, tokenizer, *, verify: Callable | None = None,
               encode: Callable | None = None, pool: pool_lib.VerifierPool | None = None):
    check_config(cfg, type(self).__name__, self.unsupported, self.provides)
    self.cfg, self.model_config, self.tokenizer, self.verify = cfg, model_config, tokenizer, verify
    self.encode = encode or (lambda s: tokenizer.encode(s, add_bos=True))
    self.sampling = with_interrupt_tokens(dataclasses.replace(
        cfg.sampling, stop_token_ids=cfg.sampling.stop_token_ids or tuple(tokenizer.stop_ids), pad_id=tokenizer.pad_id),
        tokenizer.encode)
    self.with_ref = needs_reference(cfg)
    self.temperature = 1.0 if self.sampling.greedy else self.sampling.temperature
    self._own_pool = self.verifies and pool is None
    self.pool = (pool or pool_lib.VerifierPool(timeout_s=cfg.verifier_timeout_s)) if self.verifies else None

  def close(self) -> None:
    if self._own_pool:
      self.pool.close()


@dataclasses.dataclass
class TraceStats:
  """Per-trace reductions, the only inputs of the step's shared metrics (float64 sums over response tokens).

  outcome_B: verifier / environment reward; correct_B: 1 where the trace counts as solved (accuracy);
  self_certainty_B: mean token self-certainty (None when not computed); response_B: response tokens;
  entropy_sum_B, kl_sum_B: sums over response tokens (None when not computed); extra_B: collector-specific per-trace
  values logged as their mean; counts: collector-specific event counts logged as their sum.
  """
  correct_B: np.ndarray
  response_B: np.ndarray
  outcome_B: np.ndarray | None = None
  self_certainty_B: np.ndarray | None = None
  entropy_sum_B: np.ndarray | None = None
  kl_sum_B: np.ndarray | None = None
  extra_B: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  counts: dict[str, float] = dataclasses.field(default_factory=dict)


def token_sum(x_BxN, mask_BxN) -> np.ndarray:
  """float64[B]: per-trace sum of x over the mask (any trailing axes are the trace's tokens)."""
  x, m = np.asarray(x_BxN, np.float64), np.asarray(mask_BxN) > 0
  return np.where(m, x, 0.0).reshape(len(x), -1).sum(1)


def kl_sum(old_logp, ref_logp, response_mask) -> np.ndarray:
  """float64[B]: per-trace sum of the k3 KL(policy || reference) over response tokens, from per-token log-probs."""
  return token_sum(np.asarray(k3_kl(np.asarray(old_logp), np.asarray(ref_logp))), response_mask)


def group_correlation(x_B, y_B, group_size: int) -> float:
  """Mean within-group correlation of x and y (groups with no variance in either are skipped; 0 if none).

  With x = self-certainty and y = verifier reward it says whether the model's confidence ranks its own
  samples the way the verifier does, which is what Intuitor relies on.
  """
  x = np.asarray(x_B, np.float64).reshape(-1, group_size)
  y = np.asarray(y_B, np.float64).reshape(-1, group_size)
  xc, yc = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
  denom = np.sqrt((xc ** 2).sum(1) * (yc ** 2).sum(1))
  ok = denom > 1e-12
  return float(np.mean((xc * yc).sum(1)[ok] / denom[ok])) if ok.any() else 0.0


# ---- multi-host: each process builds its own rows; these move the few values the processes must agree on


def params_mesh(params):
  """The mesh the (global) params live on."""
  return jax.tree.leaves(params)[0].sharding.mesh


def single_process_only(collector: str) -> None:
  if jax.process_count() > 1:
    raise ValueError(f"{collector} collects on one process only ({jax.process_count()} are running); multi-host "
                     f"collection is implemented by GroupCollector")


def rewards_and_advantages(cfg, inputs: rewards_lib.RewardInputs, stats: TraceStats
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
  """The step's rewards, advantages and shared metrics from this process's traces.

  Returns (reward_B total per trace, adv_B float32, keep_B float32, metrics), rows local to this process. Rewards
  are normalised over the global batch (every process's traces, gathered), so batch-level normalisation and the
  metrics equal a one-host run's.
  """
  rewards_BxR = rewards_lib.reward_columns(cfg.reward, inputs)
  weights = np.asarray(cfg.mix_weights, np.float32) if cfg.reward == "mix" else None
  local = len(rewards_BxR)
  # float32 per-trace values on every path: the multi-host gather moves them through jax (no float64), and one
  # host must compute exactly what several do
  local_stats = jax.tree.map(lambda x: np.asarray(x, np.float32), dataclasses.asdict(stats))
  g_rewards, g = distributed.host_allgather((rewards_BxR, local_stats))
  g = TraceStats(**g)
  first = jax.process_index() * local  # every process holds the same number of traces
  adv_B, keep_B = jax.device_get(compute_advantages(g_rewards, cfg.advantage, cfg.group_size, weights))
  adv_B, keep_B = np.asarray(adv_B, np.float32), np.asarray(keep_B, np.float32)
  total_B = g_rewards @ (weights if weights is not None else np.ones(1, np.float32))
  n_tokens = max(float(g.response_B.sum()), 1.0)
  metrics = {"reward_mean": float(np.mean(total_B)), "reward_std": float(np.std(total_B)),
             "accuracy": float(np.mean(g.correct_B)), "response_len": float(np.mean(g.response_B)),
             "zero_var_frac": float(1 - np.mean(keep_B))}
  if g.self_certainty_B is not None:
    metrics["self_certainty_reward"] = float(np.mean(g.self_certainty_B))
    if g.outcome_B is not None:
      metrics["sc_acc_corr"] = group_correlation(g.self_certainty_B, g.outcome_B, cfg.group_size)
  if g.entropy_sum_B is not None:
    metrics["sample_entropy"] = float(g.entropy_sum_B.sum() / n_tokens)
  if g.kl_sum_B is not None:
    metrics["kl"] = float(g.kl_sum_B.sum() / n_tokens)
  metrics.update({k: float(np.nanmean(v)) for k, v in g.extra_B.items()})  # NaN: not this metric's trace
  metrics.update({k: float(np.sum(v)) for k, v in g.counts.items()})
  rows = slice(first, first + local)
  return total_B[rows], adv_B[rows], keep_B[rows], metrics
