"""Group-relative advantages for the GRPO family (GRPO, Dr.GRPO, ScaleRL batch-level), with
zero-variance group filtering and Intuitor-style mixing of several rewards.

Rows are rollouts. By default they come as contiguous groups of `group_size` rows that share a prompt
(B = P * G); an explicit `group_id_B` may be given instead. Every function here is pure and jit-able
with `config` and `group_size` static:

    adv_B, valid_B = jax.jit(compute_advantages, static_argnums=(1, 2))(rewards_B, config, 8)

Formulas (GRPO arXiv 2402.03300, Dr.GRPO arXiv 2503.20783, ScaleRL arXiv 2510.13786), per reward signal r and group g:
  grpo:    A = (r - mean_g) / (std_g + eps)
  drgrpo:  A = r - mean_g
  batch:   A = (r - mean_g) / (std_batch(r - mean_g) + eps)      (ScaleRL)
Several signals are normalised separately, then summed with weights: A = sum_k w_k A_k.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("grpo", "drgrpo", "batch")


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
  """How rewards become advantages.

  mode: "grpo" (divide by the group std), "drgrpo" (no std), or "batch" (ScaleRL: divide by the std
    of the group-centred values over the whole batch).
  eps: added to the std before dividing.
  filter_zero_variance: mark rows whose group has constant rewards (for every signal with a non-zero
    weight) as invalid; their advantage is 0 either way, the mask lets the trainer drop their tokens.
  std_ddof: delta degrees of freedom of the stds; 1 (unbiased) matches torch.std as used by TRL/verl.
  zero_variance_tol: a group counts as constant when max - min <= this (0.0: exactly equal).
  """
  mode: str = "grpo"
  eps: float = 1e-6
  filter_zero_variance: bool = False
  std_ddof: int = 1
  zero_variance_tol: float = 0.0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"AdvantageConfig.mode={self.mode!r} is unknown; valid choices: {MODES}")
    if self.eps < 0:
      raise ValueError(f"AdvantageConfig.eps={self.eps} must be >= 0")
    if self.std_ddof not in (0, 1):
      raise ValueError(f"AdvantageConfig.std_ddof={self.std_ddof} must be 0 or 1")
    if self.zero_variance_tol < 0:
      raise ValueError(f"AdvantageConfig.zero_variance_tol={self.zero_variance_tol} must be >= 0")


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_group_size(group_size, batch: int) -> None:
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
    raise ValueError(f"group_size={group_size!r} must be an int >= 2")
  if group_size < 2:
    raise ValueError(
        f"group_size={group_size} is too small: group-relative advantages need >= 2 rollouts per prompt")
  if batch % group_size:
    raise ValueError(
        f"batch size B={batch} is not divisible by group_size={group_size}; "
        f"B must be num_prompts * group_size")


def group_ids(batch: int, group_size: int) -> jax.Array:
  """int32[B] group index of each row for contiguous groups: row // group_size."""
  _check_group_size(group_size, batch)
  return jnp.arange(batch, dtype=jnp.int32) // group_size


def _group_mean_range(x_BxR, gid_B, num_segments: int):
  """Per-row group mean and max - min (gathered back to rows), and the per-group row counts."""
  ones_B = jnp.ones(x_BxR.shape[0], jnp.float32)
  cnt_S = jax.ops.segment_sum(ones_B, gid_B, num_segments)
  mean_SxR = jax.ops.segment_sum(x_BxR, gid_B, num_segments) / jnp.maximum(cnt_S, 1.0)[:, None]
  range_SxR = (jax.ops.segment_max(x_BxR, gid_B, num_segments)
               - jax.ops.segment_min(x_BxR, gid_B, num_segments))
  return mean_SxR[gid_B], range_SxR[gid_B], cnt_S


def compute_advantages(rewards, config: AdvantageConfig, group_size: int | None,
                       weights=None, *, group_id_B=None):
  """Advantages per row.

  Args:
    rewards: float[B] one reward per rollout, or float[B, R] for R reward signals.
    config: AdvantageConfig.
    group_size: G, rows per prompt, contiguous groups (B = P * G). May be None when `group_id_B` is
      given.
    weights: float[R] mixing weights of the R signals; default all ones. Only for 2-D rewards (or R=1).
    group_id_B: optional int[B] group of each row, values in [0, B); overrides contiguous groups.

  Returns:
    (adv_B float32[B], valid_B bool[B]). valid_B is all True unless config.filter_zero_variance, in
    which case it is False for rows whose group has constant rewards; adv_B is 0 on those rows.
  """
  if not isinstance(config, AdvantageConfig):
    raise ValueError(f"config must be an AdvantageConfig, got {type(config).__name__}")
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim == 1:
    rewards_BxR = rewards[:, None]
  elif rewards.ndim == 2:
    rewards_BxR = rewards
  else:
    raise ValueError(f"rewards must be float[B] or float[B, R]; got shape {rewards.shape}")
  batch, num_rewards = rewards_BxR.shape

  if group_id_B is None:
    if group_size is None:
      raise ValueError("give group_size (contiguous groups) or group_id_B")
    gid_B = group_ids(batch, group_size)
  else:
    if group_size is not None:
      _check_group_size(group_size, batch)
    gid_B = jnp.asarray(group_id_B, jnp.int32)
    if gid_B.shape != (batch,):
      raise ValueError(f"group_id_B has shape {gid_B.shape}; expected ({batch},)")
    if _is_concrete(group_id_B):
      g = np.asarray(group_id_B)
      if g.size and (g.min() < 0 or g.max() >= batch):
        raise ValueError(f"group_id_B values must lie in [0, {batch}); got range [{g.min()}, {g.max()}]")

  if weights is None:
    weights_R = jnp.ones((num_rewards,), jnp.float32)
  else:
    weights_R = jnp.asarray(weights, jnp.float32)
    if weights_R.shape != (num_rewards,):
      raise ValueError(
          f"weights has shape {weights_R.shape}; expected ({num_rewards},), one per reward signal")

  ddof = config.std_ddof
  mean_BxR, range_BxR, cnt_S = _group_mean_range(rewards_BxR, gid_B, batch)
  const_BxR = range_BxR <= config.zero_variance_tol
  # Exact zero on constant groups: r - mean of equal floats can be a rounding crumb, and crumb/(crumb+eps)
  # would be an O(1) fake advantage.
  centred_BxR = jnp.where(const_BxR, 0.0, rewards_BxR - mean_BxR)

  # A signal with weight 0 carries no learning signal, so it does not keep a group alive.
  live_BxR = jnp.logical_and(~const_BxR, (weights_R != 0)[None, :])
  if config.filter_zero_variance:
    valid_B = jnp.any(live_BxR, axis=1)
  else:
    valid_B = jnp.ones((batch,), bool)

  if config.mode == "grpo":
    sq_SxR = jax.ops.segment_sum(centred_BxR**2, gid_B, batch)
    std_SxR = jnp.sqrt(sq_SxR / jnp.maximum(cnt_S - ddof, 1.0)[:, None])
    adv_BxR = centred_BxR / (std_SxR[gid_B] + config.eps)
  elif config.mode == "drgrpo":
    adv_BxR = centred_BxR
  else:  # batch
    # Filtered rows leave the batch, so they do not shrink the batch std.
    incl_B = valid_B.astype(jnp.float32)
    n = jnp.sum(incl_B)
    mu_R = jnp.sum(centred_BxR * incl_B[:, None], axis=0) / jnp.maximum(n, 1.0)
    var_R = (jnp.sum(incl_B[:, None] * (centred_BxR - mu_R) ** 2, axis=0)
             / jnp.maximum(n - ddof, 1.0))
    adv_BxR = centred_BxR / (jnp.sqrt(var_R)[None, :] + config.eps)

  adv_B = jnp.sum(adv_BxR * weights_R[None, :], axis=1)
  adv_B = jnp.where(valid_B, adv_B, 0.0)
  return adv_B, valid_B
