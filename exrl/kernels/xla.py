"""Chunked-XLA token statistics: streams over vocabulary blocks, never materialising [N, V] logits.

Forward: a fori_loop over blocks of `block_v` columns folds each [N, block_v] logit block into online-logsumexp
state (exrl/kernels/online.py). Backward (custom_vjp): recomputes each block, accumulates dhidden in fp32 and adds the
block's dW into one fp32 [D, V] buffer in place with dynamic_update_slice, so no stacked or padded D×V temporary exists.
A ragged last block starts at V − block_v (clamped) and masks the columns the previous block already covered.
layout="VxD" reads w as stored [V, D] (a tied head is the embedding): blocks are row slices, contracted over D, and
dW accumulates as [V, D], so neither w nor dW is ever transposed (each is one V×D fp32 copy less, 519 MB for Qwen's
tied 151936 × 896 head).
"""
import functools

import jax
import jax.numpy as jnp

from exrl.kernels import online
from exrl.kernels.stats import TokenStats, check_inputs

DEFAULT_BLOCK_V = 1024


def _block(i, block, vocab_size, targets_Nx1):
  """Clamped start of block i, its column mask [1, B] and target-hit mask [N, B]."""
  start = jnp.minimum(i * block, vocab_size - block)
  cols_1xB = start + jnp.arange(block, dtype=jnp.int32)[None, :]
  valid_1xB = cols_1xB >= i * block  # the clamped last block re-reads columns the previous block owns
  return start, valid_1xB, (cols_1xB == targets_Nx1) & valid_1xB


def _logits(hidden_NxD, w, start, block, temperature, vxd):
  """z [N, B] of block columns start.. and the block of w ([D, B], or [B, D] when vxd)."""
  w_blk = jax.lax.dynamic_slice_in_dim(w, start, block, axis=0 if vxd else 1)
  contract = (((1,), (1,)), ((), ())) if vxd else (((1,), (0,)), ((), ()))
  return jax.lax.dot_general(hidden_NxD, w_blk, contract, preferred_element_type=jnp.float32) / temperature, w_blk


def _forward(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, block_v, vxd):
  n, v = hidden_NxD.shape[0], w_DxV.shape[0 if vxd else 1]
  block = min(block_v, v)
  has_ref = ref_hidden_NxD is not None
  targets_Nx1 = targets_N.astype(jnp.int32)[:, None]

  def body(i, state):
    start, valid_1xB, hit_NxB = _block(i, block, v, targets_Nx1)
    z_NxB, _ = _logits(hidden_NxD, w_DxV, start, block, temperature, vxd)
    zr_NxB = _logits(ref_hidden_NxD, ref_w_DxV, start, block, temperature, vxd)[0] if has_ref else None
    return online.update(state, z_NxB, zr_NxB, valid_1xB, hit_NxB)

  # Block 0 is peeled so the carry takes its type (incl. shard_map varying axes) from the data, not from zeros.
  state = jax.lax.fori_loop(1, -(-v // block), body, body(0, online.init(n, has_ref)))
  return {k: x[:, 0] for k, x in online.finalize(state, v).items()}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _stats(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, block_v, vxd):
  return _forward(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, block_v, vxd)


def _stats_fwd(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, block_v, vxd):
  out = _forward(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, block_v, vxd)
  return out, (hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, out)


def _stats_bwd(temperature, block_v, vxd, res, g):
  """w_DxV (and dw) are [V, D] when vxd."""
  hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, out = res
  (n, d), v = hidden_NxD.shape, w_DxV.shape[0 if vxd else 1]
  block = min(block_v, v)
  has_ref = ref_hidden_NxD is not None
  col = lambda x: None if x is None else x[:, None]
  coefs = online.grad_coefs(col(out["lse"]), col(out["entropy"]), col(out.get("kl")), col(out.get("ref_lse")),
                            col(g["logp"]), col(g["lse"]), col(g["entropy"]), col(g["self_certainty"]),
                            col(g.get("kl")), v)
  targets_Nx1 = targets_N.astype(jnp.int32)[:, None]
  # hidden in fp32, transposed once outside the loop for the D×V layout; VxD contracts over N in place.
  hidden32 = hidden_NxD.astype(jnp.float32) if vxd else hidden_NxD.astype(jnp.float32).T
  v_axis = 0 if vxd else 1

  def body(i, carry):
    dh_NxD, dw = carry
    start, valid_1xB, hit_NxB = _block(i, block, v, targets_Nx1)
    z_NxB, w_blk = _logits(hidden_NxD, w_DxV, start, block, temperature, vxd)
    zr_NxB = _logits(ref_hidden_NxD, ref_w_DxV, start, block, temperature, vxd)[0] if has_ref else None
    dz_NxB = online.dz_block(z_NxB, zr_NxB, valid_1xB, hit_NxB, coefs) / temperature
    if vxd:  # w_blk [B, D]: dh += dz w_blk, dw_blk [B, D] = dz^T h
      dh_NxD = dh_NxD + jnp.dot(dz_NxB, w_blk.astype(jnp.float32))
      dw_blk = jax.lax.dot_general(dz_NxB, hidden32, (((0,), (0,)), ((), ())))
    else:  # w_blk [D, B]: dh += dz w_blk^T, dw_blk [D, B] = h^T dz
      dh_NxD = dh_NxD + jax.lax.dot_general(dz_NxB, w_blk.astype(jnp.float32), (((1,), (1,)), ((), ())))
      dw_blk = jnp.dot(hidden32, dz_NxB)
    # Add, not overwrite: the clamped last block overlaps columns already written (its dz there is 0).
    dw_blk = jax.lax.dynamic_slice_in_dim(dw, start, block, axis=v_axis) + dw_blk
    return dh_NxD, jax.lax.dynamic_update_slice_in_dim(dw, dw_blk, start, axis=v_axis)

  init = (jnp.zeros((n, d), jnp.float32), jnp.zeros((v, d) if vxd else (d, v), jnp.float32))
  dh_NxD, dw_DxV = jax.lax.fori_loop(1, -(-v // block), body, body(0, init))
  return dh_NxD.astype(hidden_NxD.dtype), dw_DxV.astype(w_DxV.dtype), None, None, None


_stats.defvjp(_stats_fwd, _stats_bwd)


def token_stats(hidden_NxD, w_DxV, targets_N, *, ref_hidden_NxD=None, ref_w_DxV=None, temperature=1.0,
                block_v=DEFAULT_BLOCK_V, layout="DxV"):
  """TokenStats of z = (hidden @ w)/temperature, streamed over vocab blocks of block_v columns.

  hidden_NxD: [N, D] float; w_DxV: [D, V] float ([V, D] with layout="VxD", as is ref_w_DxV); targets_N: int[N]
  in [0, V). Differentiable in hidden and w (its gradient in w's layout); the reference inputs are stop-gradient.
  All outputs float32[N].
  """
  check_inputs(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, layout)
  if block_v < 1:
    raise ValueError(f"block_v must be >= 1; got {block_v}")
  if ref_hidden_NxD is not None:
    ref_hidden_NxD, ref_w_DxV = jax.lax.stop_gradient(ref_hidden_NxD), jax.lax.stop_gradient(ref_w_DxV)
  out = _stats(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, float(temperature), int(block_v),
               layout == "VxD")
  return TokenStats(**out)
