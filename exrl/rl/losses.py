"""GRPO-family policy losses: PPO-clip (with DAPO clip-higher) and CISPO, a KL to the reference
(k3 or the kernel's exact KL), an entropy bonus, and four loss aggregations (DAPO arXiv 2503.14476,
Dr.GRPO arXiv 2503.20783, CISPO arXiv 2506.13585, ScaleRL arXiv 2510.13786).

Rows are sequences of fixed width T. A row may be a whole rollout or one packed segment of a longer
trace (a Delethink chunk): rows sharing a `trace_id_B` are one trace, carry the trace's advantage,
and "seq_mean_token_mean" normalises by the trace's total response tokens. Only tokens with
mask_BxT > 0 carry loss; the mask comes from the rollout (multi-turn: agent tokens only).

Inner epochs. The trainer calls `policy_loss` several times on one rollout batch, each time with the
current policy's `logp_BxT` and the same `old_logp_BxT` kept from the rollout. ρ = exp(logp - old_logp)
is computed from the masked log-ratio, so when logp == old_logp (the first epoch, with old_logp
recomputed by the same forward as logp) ρ is exactly 1, nothing is clipped, and the gradient is the
plain policy gradient -A * ∇logp / normaliser. `old_logp_BxT` and `ref_logp_BxT` are stop-gradiented
here, so passing arrays that depend on the params is safe.

Everything is pure and jit-able with `config` static; segment reductions use num_segments=B, so a
shape compiles once whatever the trace / group ids are. Ids must lie in [0, B) (checked when concrete).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("ppo", "cispo")
RATIO_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k3", "exact")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "constant", "prompt")

_sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Policy-loss options.

  kind: "ppo" (clip objective min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A)) or "cispo" (sg(min(ρ, ε_max)) A logπ).
  clip_eps_low / clip_eps_high: PPO clip range; clip_eps_high > clip_eps_low is DAPO clip-higher.
  cispo_eps_max: CISPO importance-weight truncation (ScaleRL: insensitive within {4, 5, 8}).
  kl_beta: weight of the per-token KL to the reference (0 turns it off).
  kl_estimator: "k3" (exp(r-π) - (r-π) - 1 from sampled-token log-probs; needs ref_logp_BxT) or "exact"
    (the full-vocabulary KL from the fused kernel; needs exact_kl_BxT).
  entropy_coef: weight of the entropy bonus (loss gets -coef * entropy per token; needs entropy_BxT).
  aggregation: "token_mean" (all masked tokens of the batch), "seq_mean_token_mean" (mean over traces of
    each trace's token mean), "constant" (Dr.GRPO: token sum / (num_traces * constant_normalizer)),
    "prompt" (ScaleRL: per group token sum / group tokens, then mean over groups; needs group_id_B).
  constant_normalizer: tokens per sequence for "constant", e.g. the max response length; None means T.
  ratio_level: "token" (ρ per token) or "sequence" (GSPO, arXiv 2507.18071: every token of a row shares
    ρ_i = exp(mean over the row's masked tokens of log π - log π_old), so its gradient is ρ_i A mean_t ∇logπ).
  tis_cap: truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL"; verl / OpenRLHF): with behaviour log-probs μ given to `policy_loss`, each token's objective is
    multiplied by sg(min(π_old / μ, tis_cap)). 0 turns it off.
  """
  kind: str = "ppo"
  clip_eps_low: float = 0.2
  clip_eps_high: float = 0.2
  cispo_eps_max: float = 4.0
  kl_beta: float = 0.0
  kl_estimator: str = "k3"
  entropy_coef: float = 0.0
  aggregation: str = "token_mean"
  constant_normalizer: float | None = None
  ratio_level: str = "token"
  tis_cap: float = 0.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"LossConfig.kind={self.kind!r} is unknown; valid choices: {KINDS}")
    if self.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(
          f"LossConfig.kl_estimator={self.kl_estimator!r} is unknown; valid choices: {KL_ESTIMATORS}")
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(
          f"LossConfig.aggregation={self.aggregation!r} is unknown; valid choices: {AGGREGATIONS}")
    if not 0 <= self.clip_eps_low < 1:
      raise ValueError(f"LossConfig.clip_eps_low={self.clip_eps_low} must be in [0, 1)")
    if self.clip_eps_high < 0:
      raise ValueError(f"LossConfig.clip_eps_high={self.clip_eps_high} must be >= 0")
    if self.cispo_eps_max <= 0:
      raise ValueError(f"LossConfig.cispo_eps_max={self.cispo_eps_max} must be > 0")
    if self.kl_beta < 0:
      raise ValueError(f"LossConfig.kl_beta={self.kl_beta} must be >= 0")
    if self.ratio_level not in RATIO_LEVELS:
      raise ValueError(f"LossConfig.ratio_level={self.ratio_level!r} is unknown; valid choices: {RATIO_LEVELS}")
    if self.tis_cap < 0:
      raise ValueError(f"LossConfig.tis_cap={self.tis_cap} must be >= 0 (0 turns truncated IS off)")
    if self.constant_normalizer is not None and self.constant_normalizer <= 0:
      raise ValueError(f"LossConfig.constant_normalizer={self.constant_normalizer} must be > 0 or None")


def k3_kl(logp_BxT, ref_logp_BxT):
  """Per-token k3 estimate of KL(π ‖ ref) from sampled-token log-probs: exp(r-π) - (r-π) - 1 >= 0."""
  d = ref_logp_BxT - logp_BxT
  return jnp.exp(d) - d - 1.0


def _check_ids(name: str, ids, batch: int):
  if ids is None:
    return None
  ids_B = jnp.asarray(ids, jnp.int32)
  if ids_B.shape != (batch,):
    raise ValueError(f"{name} has shape {ids_B.shape}; expected ({batch},), one id per row")
  if not isinstance(ids, jax.core.Tracer):
    a = np.asarray(ids)
    if a.size and (a.min() < 0 or a.max() >= batch):
      raise ValueError(f"{name} values must lie in [0, {batch}); got range [{a.min()}, {a.max()}]")
  return ids_B


def _masked_mean(x_BxT, mask_BxT):
  return jnp.sum(x_BxT * mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)


def _segment_mean_of_means(sum_B, cnt_B, seg_B, batch: int):
  """Mean over non-empty segments of (segment token sum / segment token count)."""
  sum_S = jax.ops.segment_sum(sum_B, seg_B, batch)
  cnt_S = jax.ops.segment_sum(cnt_B, seg_B, batch)
  present_S = cnt_S > 0
  mean_S = jnp.where(present_S, sum_S / jnp.maximum(cnt_S, 1.0), 0.0)
  return jnp.sum(mean_S) / jnp.maximum(jnp.sum(present_S), 1)


def aggregate(loss_BxT, mask_BxT, aggregation: str, *, trace_id_B=None, group_id_B=None,
              constant_normalizer: float | None = None):
  """Reduce per-token losses to a scalar (see LossConfig.aggregation). Empty masks give 0, not NaN.

  Traces / groups with no masked tokens are left out of the means of "seq_mean_token_mean" and
  "prompt" (a zero-variance-filtered group drops out). "constant" divides by the number of distinct
  trace ids present in trace_id_B (B by default), whatever their token counts, so it stays constant.
  """
  batch, width = loss_BxT.shape
  mask_BxT = mask_BxT.astype(jnp.float32)
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation={aggregation!r} is unknown; valid choices: {AGGREGATIONS}")
  trace_id_B = _check_ids("trace_id_B", trace_id_B, batch)
  group_id_B = _check_ids("group_id_B", group_id_B, batch)
  if trace_id_B is None:
    trace_id_B = jnp.arange(batch, dtype=jnp.int32)
  tok_sum_B = jnp.sum(loss_BxT * mask_BxT, axis=1)
  tok_cnt_B = jnp.sum(mask_BxT, axis=1)

  if aggregation == "token_mean":
    return jnp.sum(tok_sum_B) / jnp.maximum(jnp.sum(tok_cnt_B), 1.0)
  if aggregation == "seq_mean_token_mean":
    return _segment_mean_of_means(tok_sum_B, tok_cnt_B, trace_id_B, batch)
  if aggregation == "constant":
    c = width if constant_normalizer is None else constant_normalizer  # may be traced (packed rows' width)
    rows_S = jax.ops.segment_sum(jnp.ones((batch,), jnp.float32), trace_id_B, batch)
    num_traces = jnp.sum(rows_S > 0)
    return jnp.sum(tok_sum_B) / (num_traces * c)
  # prompt
  if group_id_B is None:
    raise ValueError(
        "aggregation='prompt' needs group_id_B (int[B], the prompt group of each row, e.g. row // G)")
  return _segment_mean_of_means(tok_sum_B, tok_cnt_B, group_id_B, batch)


def _check_like(name: str, x, shape):
  if x is not None and tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {tuple(shape)} like logp_BxT")


def policy_loss(logp_BxT, old_logp_BxT, adv_B, mask_BxT, config: LossConfig, *, ref_logp_BxT=None,
                exact_kl_BxT=None, entropy_BxT=None, trace_id_B=None, group_id_B=None, row_width=None,
                behav_logp_BxT=None):
  """GRPO-family policy loss.

  Args:
    logp_BxT: float[B, T] log π(token) of the sampled tokens under the current params (differentiable).
    old_logp_BxT: float[B, T] the same under the rollout policy (kept fixed across inner epochs).
    adv_B: float[B] per-row advantage (every token of a row/trace shares it), or float[B, T] per token.
    mask_BxT: bool/float[B, T] which tokens carry loss (float values act as token weights).
    config: LossConfig.
    ref_logp_BxT: float[B, T] reference-policy log-probs, for the k3 KL.
    exact_kl_BxT: float[B, T] exact per-token KL(π ‖ ref) from the fused kernel (differentiable).
    entropy_BxT: float[B, T] per-token policy entropy in nats (differentiable).
    trace_id_B: int[B] trace of each row (packed chunks share one); default: each row its own trace.
    group_id_B: int[B] prompt group of each row; required by aggregation="prompt".
    row_width: the rows' width before any padding past it (packed rows, `train.packing`), for "constant"'s
      default normaliser; None: T.
    behav_logp_BxT: float[B, T] log-probs of the policy that sampled each token (the generator's, possibly of
      several versions in one row), for truncated IS (config.tis_cap > 0).

  Returns:
    (loss, metrics): loss float32 scalar to minimise; metrics dict of float32 scalars, token means
    over masked tokens: ratio_mean, clip_frac_low, clip_frac_high, clip_frac, approx_kl (k3 estimate of
    KL(old ‖ new)), pg_loss (policy term alone, aggregated like the loss), num_tokens, kl / entropy when those
    inputs are given, and tis_weight_mean / tis_clip_frac with truncated IS.
  """
  if not isinstance(config, LossConfig):
    raise ValueError(f"config must be a LossConfig, got {type(config).__name__}")
  if logp_BxT.ndim != 2:
    raise ValueError(f"logp_BxT must be float[B, T]; got shape {logp_BxT.shape}")
  shape = logp_BxT.shape
  batch = shape[0]
  for name, x in (("old_logp_BxT", old_logp_BxT), ("mask_BxT", mask_BxT),
                  ("ref_logp_BxT", ref_logp_BxT), ("exact_kl_BxT", exact_kl_BxT),
                  ("entropy_BxT", entropy_BxT), ("behav_logp_BxT", behav_logp_BxT)):
    _check_like(name, x, shape)
  if adv_B.shape not in ((batch,), shape):
    raise ValueError(f"adv_B has shape {adv_B.shape}; expected ({batch},) or {tuple(shape)}")
  if config.kl_beta > 0 and config.kl_estimator == "k3" and ref_logp_BxT is None:
    raise ValueError("kl_beta > 0 with kl_estimator='k3' needs ref_logp_BxT (reference log-probs)")
  if config.kl_beta > 0 and config.kl_estimator == "exact" and exact_kl_BxT is None:
    raise ValueError("kl_beta > 0 with kl_estimator='exact' needs exact_kl_BxT (from kernels.token_stats)")
  if config.tis_cap > 0 and behav_logp_BxT is None:
    raise ValueError(f"tis_cap={config.tis_cap} needs behav_logp_BxT (the generator's per-token log-probs)")
  if config.entropy_coef != 0 and entropy_BxT is None:
    raise ValueError(f"entropy_coef={config.entropy_coef} needs entropy_BxT")
  if config.aggregation == "prompt" and group_id_B is None:
    raise ValueError(
        "aggregation='prompt' needs group_id_B (int[B], the prompt group of each row, e.g. row // G)")

  mask_BxT = mask_BxT.astype(jnp.float32)
  on_BxT = mask_BxT > 0
  logp_BxT = logp_BxT.astype(jnp.float32)
  # Masked positions may hold garbage (padding); zero them before exp so they cannot make inf * 0 = NaN.
  logp_on_BxT = jnp.where(on_BxT, logp_BxT, 0.0)
  old_on_BxT = jnp.where(on_BxT, _sg(old_logp_BxT).astype(jnp.float32), 0.0)
  log_ratio_BxT = logp_on_BxT - old_on_BxT
  if config.ratio_level == "sequence":  # GSPO: the row's mean log-ratio, differentiable, on every token of the row
    seq_B = jnp.sum(log_ratio_BxT * mask_BxT, axis=1) / jnp.maximum(jnp.sum(mask_BxT, axis=1), 1.0)
    log_ratio_BxT = jnp.where(on_BxT, seq_B[:, None], 0.0)
  ratio_BxT = jnp.exp(log_ratio_BxT)
  adv_BxT = jnp.broadcast_to(
      (adv_B[:, None] if adv_B.ndim == 1 else adv_B).astype(jnp.float32), shape)
  adv_BxT = _sg(adv_BxT)

  if config.kind == "ppo":
    lo, hi = 1.0 - config.clip_eps_low, 1.0 + config.clip_eps_high
    obj_BxT = jnp.minimum(ratio_BxT * adv_BxT, jnp.clip(ratio_BxT, lo, hi) * adv_BxT)
    # The clip is active (zero gradient) where the clipped branch wins the min.
    clip_low_BxT = (ratio_BxT < lo) & (adv_BxT < 0)
    clip_high_BxT = (ratio_BxT > hi) & (adv_BxT > 0)
  else:  # cispo
    weight_BxT = _sg(jnp.minimum(ratio_BxT, config.cispo_eps_max))
    obj_BxT = weight_BxT * adv_BxT * logp_on_BxT
    clip_low_BxT = jnp.zeros(shape, bool)
    clip_high_BxT = ratio_BxT > config.cispo_eps_max
  tis_BxT = None
  if config.tis_cap > 0:  # weight by the (truncated) ratio of the trainer's old policy to the behaviour policy
    behav_on_BxT = jnp.where(on_BxT, _sg(behav_logp_BxT).astype(jnp.float32), 0.0)
    tis_BxT = jnp.minimum(jnp.exp(old_on_BxT - behav_on_BxT), config.tis_cap)
    obj_BxT = tis_BxT * obj_BxT
  tok_loss_BxT = -obj_BxT

  kl_BxT = None
  if config.kl_estimator == "k3" and ref_logp_BxT is not None:
    ref_on_BxT = jnp.where(on_BxT, _sg(ref_logp_BxT).astype(jnp.float32), 0.0)
    kl_BxT = k3_kl(logp_on_BxT, ref_on_BxT)
  elif config.kl_estimator == "exact" and exact_kl_BxT is not None:
    kl_BxT = jnp.where(on_BxT, exact_kl_BxT.astype(jnp.float32), 0.0)
  if config.kl_beta > 0:
    tok_loss_BxT = tok_loss_BxT + config.kl_beta * kl_BxT

  ent_BxT = None
  if entropy_BxT is not None:
    ent_BxT = jnp.where(on_BxT, entropy_BxT.astype(jnp.float32), 0.0)
    if config.entropy_coef != 0:
      tok_loss_BxT = tok_loss_BxT - config.entropy_coef * ent_BxT

  agg = dict(trace_id_B=trace_id_B, group_id_B=group_id_B,
             constant_normalizer=row_width if config.constant_normalizer is None else config.constant_normalizer)
  loss = aggregate(tok_loss_BxT, mask_BxT, config.aggregation, **agg)

  f32 = lambda b: b.astype(jnp.float32)
  metrics = {
      "pg_loss": aggregate(-obj_BxT, mask_BxT, config.aggregation, **agg),
      "ratio_mean": _masked_mean(ratio_BxT, mask_BxT),
      "clip_frac_low": _masked_mean(f32(clip_low_BxT), mask_BxT),
      "clip_frac_high": _masked_mean(f32(clip_high_BxT), mask_BxT),
      "clip_frac": _masked_mean(f32(clip_low_BxT | clip_high_BxT), mask_BxT),
      # k3 of KL(old ‖ new) with samples from old: ρ - 1 - log ρ.
      "approx_kl": _masked_mean(ratio_BxT - 1.0 - log_ratio_BxT, mask_BxT),
      "num_tokens": jnp.sum(mask_BxT),
  }
  if kl_BxT is not None:
    metrics["kl"] = _masked_mean(kl_BxT, mask_BxT)
  if ent_BxT is not None:
    metrics["entropy"] = _masked_mean(ent_BxT, mask_BxT)
  if tis_BxT is not None:
    metrics["tis_weight_mean"] = _masked_mean(tis_BxT, mask_BxT)
    metrics["tis_clip_frac"] = _masked_mean(f32(tis_BxT >= config.tis_cap), mask_BxT)
  metrics = jax.tree.map(_sg, metrics)
  return loss, metrics
