"""Chunked-XLA token statistics: streams over vocabulary blocks, never materialising [N, V] logits.

Forward: a fori_loop over blocks of `block_v` columns folds each [N, block_v] logit block into online-logsumexp
state (exrl/kernels/online.py). Backward (custom_vjp): recomputes each block, accumulates dhidden in fp32 and adds the
block's dW into one fp32 [D, V] buffer in place with dynamic_update_slice, so no stacked or padded D×V temporary exists.
A ragged last block starts at V − block_v (clamped) and masks the columns the previous block already covered.
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


def _logits(hidden_NxD, w_DxV, start, block, temperature):
  w_DxB = jax.lax.dynamic_slice_in_dim(w_DxV, start, block, axis=1)
  return jnp.dot(hidden_NxD, w_DxB, preferred_element_type=jnp.float32) / temperature, w_DxB


def _forward(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, block_v):
  n, v = hidden_NxD.shape[0], w_DxV.shape[1]
  block = min(block_v, v)
  has_ref = ref_hidden_NxD is not None
  targets_Nx1 = targets_N.astype(jnp.int32)[:, None]

  def body(i, state):
    start, valid_1xB, hit_NxB = _block(i, block, v, targets_Nx1)
    z_NxB, _ = _logits(hidden_NxD, w_DxV, start, block, temperature)
    zr_NxB = _logits(ref_hidden_NxD, ref_w_DxV, start, block, temperature)[0] if has_ref else None
    return online.update(state, z_NxB, zr_NxB, valid_1xB, hit_NxB)

  # Block 0 is peeled so the carry takes its type (incl. shard_map varying axes) from the data, not from zeros.
  state = jax.lax.fori_loop(1, -(-v // block), body, body(0, online.init(n, has_ref)))
  return {k: x[:, 0] for k, x in online.finalize(state, v).items()}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _stats(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, block_v):
  return _forward(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, block_v)


def _stats_fwd(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, block_v):
  out = _forward(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, block_v)
  return out, (hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, out)


def _stats_bwd(temperature, block_v, res, g):
  hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, out = res
  (n, d), v = hidden_NxD.shape, w_DxV.shape[1]
  block = min(block_v, v)
  has_ref = ref_hidden_NxD is not None
  col = lambda x: None if x is None else x[:, None]
  coefs = online.grad_coefs(col(out["lse"]), col(out["entropy"]), col(out.get("kl")), col(out.get("ref_lse")),
                            col(g["logp"]), col(g["lse"]), col(g["entropy"]), col(g["self_certainty"]),
                            col(g.get("kl")), v)
  targets_Nx1 = targets_N.astype(jnp.int32)[:, None]
  hidden32_DxN = hidden_NxD.astype(jnp.float32).T  # transposed once, outside the loop

  def body(i, carry):
    dh_NxD, dw_DxV = carry
    start, valid_1xB, hit_NxB = _block(i, block, v, targets_Nx1)
    z_NxB, w_DxB = _logits(hidden_NxD, w_DxV, start, block, temperature)
    zr_NxB = _logits(ref_hidden_NxD, ref_w_DxV, start, block, temperature)[0] if has_ref else None
    dz_NxB = online.dz_block(z_NxB, zr_NxB, valid_1xB, hit_NxB, coefs) / temperature
    dh_NxD = dh_NxD + jax.lax.dot_general(dz_NxB, w_DxB.astype(jnp.float32), (((1,), (1,)), ((), ())))
    dw_DxB = jnp.dot(hidden32_DxN, dz_NxB)
    # Add, not overwrite: the clamped last block overlaps columns already written (its dz there is 0).
    dw_DxB = jax.lax.dynamic_slice_in_dim(dw_DxV, start, block, axis=1) + dw_DxB
    return dh_NxD, jax.lax.dynamic_update_slice_in_dim(dw_DxV, dw_DxB, start, axis=1)

  init = (jnp.zeros((n, d), jnp.float32), jnp.zeros((d, v), jnp.float32))
  dh_NxD, dw_DxV = jax.lax.fori_loop(1, -(-v // block), body, body(0, init))
  return dh_NxD.astype(hidden_NxD.dtype), dw_DxV.astype(w_DxV.dtype), None, None, None


_stats.defvjp(_stats_fwd, _stats_bwd)


def token_stats(hidden_NxD, w_DxV, targets_N, *, ref_hidden_NxD=None, ref_w_DxV=None, temperature=1.0,
                block_v=DEFAULT_BLOCK_V):
  """TokenStats of z = (hidden @ w)/temperature, streamed over vocab blocks of block_v columns.

  hidden_NxD: [N, D] float; w_DxV: [D, V] float; targets_N: int[N] in [0, V). Differentiable in hidden and w;
  the reference inputs are stop-gradient. All outputs float32[N].
  """
  check_inputs(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature)
  if block_v < 1:
    raise ValueError(f"block_v must be >= 1; got {block_v}")
  if ref_hidden_NxD is not None:
    ref_hidden_NxD, ref_w_DxV = jax.lax.stop_gradient(ref_hidden_NxD), jax.lax.stop_gradient(ref_w_DxV)
  out = _stats(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, float(temperature), int(block_v))
  return TokenStats(**out)
