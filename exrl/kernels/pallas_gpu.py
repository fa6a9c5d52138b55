"""Pallas (GPU, Triton backend) token statistics: token blocks stream over vocab blocks, logits tiles never leave SRAM.

Forward: grid (N/bn,); each program loops over vocab blocks of bv columns, builds the [bn, bv] logit tile with a K loop
over D in chunks of bd (tl.dot), and folds it into [bn, 1] online-logsumexp state (exrl/kernels/online.py).
Backward (custom_vjp): grid (N/bn, V/bv), fully parallel; each program recomputes its logit tile, forms dz and
atomically adds dz @ w_tileᵀ into an fp32 dhidden and h_tileᵀ @ dz into an fp32 dW (the Cut Cross-Entropy layout,
arXiv:2411.09009), so no [N, V] array and no per-program [bn, D] accumulator exists.
Triton needs every in-kernel array to have a power-of-2 size, so bn, bv and bd are powers of 2 and ragged edges of N,
D and V are masked loads (other=0) and masked stores; nothing is padded in HBM.
Off GPU it runs in interpret mode (CPU tests), where the atomics are plain sequential adds.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from exrl.kernels import online
from exrl.kernels.stats import TokenStats, check_inputs

DEFAULT_BLOCK_N = 64
DEFAULT_BLOCK_V = 128
DEFAULT_BLOCK_D = 64
_STATS = ("logp", "lse", "entropy", "self_certainty")
_REF_STATS = ("kl", "ref_logp", "ref_lse")
_COEFS = ("lse", "ref_lse", "alpha", "beta", "gamma", "g_logp", "c")


def _pow2(value, name):
  if value < 16 or value & (value - 1):
    raise ValueError(f"{name}={value} must be a power of 2 >= 16 (Triton block sizes and tl.dot's minimum)")
  return value


def _load2d(ref, r0, nr, c0, nc, rows, cols):
  """[nr, nc] tile of a 2-D ref at (r0, c0); entries outside [0, rows) x [0, cols) read as 0."""
  r = r0 + jax.lax.broadcasted_iota(jnp.int32, (nr, nc), 0)
  c = c0 + jax.lax.broadcasted_iota(jnp.int32, (nr, nc), 1)
  return plgpu.load(ref.at[pl.ds(r0, nr), pl.ds(c0, nc)], mask=(r < rows) & (c < cols), other=0)


def _tile_logits(h_ref, w_ref, r0, c0, *, n, d, v, bn, bv, bd, temperature):
  """float32[bn, bv] logits of token rows r0.. and vocab columns c0.., a K loop over D in chunks of bd."""
  def body(k, acc):
    h = _load2d(h_ref, r0, bn, k * bd, bd, n, d)
    w = _load2d(w_ref, k * bd, bd, c0, bv, d, v)
    return acc + jnp.dot(h, w, preferred_element_type=jnp.float32)
  acc = jax.lax.fori_loop(0, pl.cdiv(d, bd), body, jnp.zeros((bn, bv), jnp.float32))
  return acc / temperature


def _masks(c0, bv, v, targets_Bx1):
  """Column validity [1, bv] and target hits [bn, bv]; padded rows stay valid (they read zeros, stores drop them)."""
  cols_1xV = c0 + jax.lax.broadcasted_iota(jnp.int32, (1, bv), 1)
  valid_1xV = cols_1xV < v
  return valid_1xV, (cols_1xV == targets_Bx1) & valid_1xV


def _load_col(ref, r0, bn, n):
  rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
  return plgpu.load(ref.at[pl.ds(r0, bn)], mask=rows < n, other=0)[:, None]


def _fwd_kernel(*refs, has_ref, n, d, d_ref, v, bn, bv, bd, temperature):
  n_in = 5 if has_ref else 3
  ins, outs = refs[:n_in], refs[n_in:]
  h_ref, w_ref, t_ref = ins[:3]
  r0 = pl.program_id(0) * bn
  targets_Bx1 = _load_col(t_ref, r0, bn, n)
  geo = dict(n=n, v=v, bn=bn, bv=bv, bd=bd, temperature=temperature)

  def body(j, state):
    c0 = j * bv
    valid, hit = _masks(c0, bv, v, targets_Bx1)
    z = _tile_logits(h_ref, w_ref, r0, c0, d=d, **geo)
    zr = _tile_logits(ins[3], ins[4], r0, c0, d=d_ref, **geo) if has_ref else None
    return online.update(state, z, zr, valid, hit)

  state = jax.lax.fori_loop(0, pl.cdiv(v, bv), body, online.init(bn, has_ref))
  stats = online.finalize(state, v)
  rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
  for out, name in zip(outs, _STATS + _REF_STATS):
    plgpu.store(out.at[pl.ds(r0, bn)], stats[name][:, 0], mask=rows < n)


def _bwd_kernel(*refs, has_ref, n, d, d_ref, v, bn, bv, bd, temperature):
  n_in = (5 if has_ref else 3) + len(_COEFS) + 2
  ins, (dh_ref, dw_ref) = refs[:n_in - 2], refs[n_in:]  # the two zero inputs alias the outputs
  h_ref, w_ref, t_ref = ins[:3]
  coef_refs = ins[5:] if has_ref else ins[3:]
  r0, c0 = pl.program_id(0) * bn, pl.program_id(1) * bv
  geo = dict(n=n, v=v, bn=bn, bv=bv, bd=bd, temperature=temperature)
  valid, hit = _masks(c0, bv, v, _load_col(t_ref, r0, bn, n))
  z = _tile_logits(h_ref, w_ref, r0, c0, d=d, **geo)
  zr = _tile_logits(ins[3], ins[4], r0, c0, d=d_ref, **geo) if has_ref else None
  coefs = {k: _load_col(r, r0, bn, n).astype(jnp.float32) for k, r in zip(_COEFS, coef_refs)}
  rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
  dz = online.dz_block(z, zr, valid, hit, coefs) / temperature
  dz = jnp.where((rows < n)[:, None], dz, 0.0).astype(h_ref.dtype)  # bf16 inputs: bf16 tensor-core products

  def body(k, carry):
    k0 = k * bd
    w = _load2d(w_ref, k0, bd, c0, bv, d, v)
    dh = jax.lax.dot_general(dz, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    plgpu.atomic_add(dh_ref, (pl.ds(r0, bn), pl.ds(k0, bd)), dh)
    h = _load2d(h_ref, r0, bn, k0, bd, n, d)
    dw = jax.lax.dot_general(h, dz, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    plgpu.atomic_add(dw_ref, (pl.ds(k0, bd), pl.ds(c0, bv)), dw)
    return carry

  jax.lax.fori_loop(0, pl.cdiv(d, bd), body, 0)


def _geometry(hidden_NxD, w_DxV, ref_hidden_NxD):
  (n, d), v = hidden_NxD.shape, w_DxV.shape[1]
  return dict(n=n, d=d, v=v, d_ref=ref_hidden_NxD.shape[1] if ref_hidden_NxD is not None else 0)


def _args(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV):
  args = [hidden_NxD, w_DxV, targets_N.astype(jnp.int32)]
  return args + ([ref_hidden_NxD, ref_w_DxV] if ref_hidden_NxD is not None else [])


def _forward(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, blocks, interpret):
  has_ref = ref_hidden_NxD is not None
  geo = _geometry(hidden_NxD, w_DxV, ref_hidden_NxD)
  bn, bv, bd, warps = blocks
  names = _STATS + (_REF_STATS if has_ref else ())
  kernel = functools.partial(_fwd_kernel, has_ref=has_ref, bn=bn, bv=bv, bd=bd, temperature=temperature, **geo)
  outs = pl.pallas_call(
      kernel, grid=(pl.cdiv(geo["n"], bn),),
      out_shape=[jax.ShapeDtypeStruct((geo["n"],), jnp.float32) for _ in names],
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=2), interpret=interpret,
      name="token_stats_gpu_fwd",
  )(*_args(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV))
  return dict(zip(names, outs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _stats(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, blocks, interpret):
  return _forward(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, blocks, interpret)


def _stats_fwd(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, blocks, interpret):
  out = _forward(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, blocks, interpret)
  return out, (hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, out)


def _stats_bwd(temperature, blocks, interpret, res, g):
  hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, out = res
  has_ref = ref_hidden_NxD is not None
  geo = _geometry(hidden_NxD, w_DxV, ref_hidden_NxD)
  n, d, v = geo["n"], geo["d"], geo["v"]
  bn, bv, bd, warps = blocks
  col = lambda x: None if x is None else x[:, None]
  coefs = online.grad_coefs(col(out["lse"]), col(out["entropy"]), col(out.get("kl")), col(out.get("ref_lse")),
                            col(g["logp"]), col(g["lse"]), col(g["entropy"]), col(g["self_certainty"]),
                            col(g.get("kl")), v)
  coefs = [jnp.broadcast_to(coefs[k], (n, 1))[:, 0] for k in _COEFS]
  args = _args(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV) + coefs
  # Unmasked atomics into block-padded fp32 buffers (padding gets only zeros and is sliced off); Qwen's
  # D=896 and V=151936 are already multiples of the default blocks, so nothing extra is allocated there.
  nt, nd, nv = pl.cdiv(n, bn), pl.cdiv(d, bd), pl.cdiv(v, bv)
  shapes = [(nt * bn, nd * bd), (nd * bd, nv * bv)]
  zeros = [jnp.zeros(s, jnp.float32) for s in shapes]
  kernel = functools.partial(_bwd_kernel, has_ref=has_ref, bn=bn, bv=bv, bd=bd, temperature=temperature, **geo)
  dh_NxD, dw_DxV = pl.pallas_call(
      kernel, grid=(nt, nv), out_shape=[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes],
      input_output_aliases={len(args): 0, len(args) + 1: 1},
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=2), interpret=interpret,
      name="token_stats_gpu_bwd",
  )(*args, *zeros)
  return dh_NxD[:n, :d].astype(hidden_NxD.dtype), dw_DxV[:d, :v].astype(w_DxV.dtype), None, None, None


_stats.defvjp(_stats_fwd, _stats_bwd)


def token_stats(hidden_NxD, w_DxV, targets_N, *, ref_hidden_NxD=None, ref_w_DxV=None, temperature=1.0,
                block_n=DEFAULT_BLOCK_N, block_v=DEFAULT_BLOCK_V, block_d=DEFAULT_BLOCK_D, num_warps=4,
                interpret=None):
  """TokenStats via the Triton-backend Pallas kernels; same contract as kernels.api.token_stats.

  block_n / block_v / block_d: token, vocab and hidden tile sizes (powers of 2, >= 16).
  interpret: None runs compiled on GPU and in interpret mode elsewhere; True forces interpret mode.
  """
  check_inputs(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature)
  blocks = (_pow2(int(block_n), "block_n"), _pow2(int(block_v), "block_v"), _pow2(int(block_d), "block_d"),
            int(num_warps))
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if ref_hidden_NxD is not None:
    ref_hidden_NxD, ref_w_DxV = jax.lax.stop_gradient(ref_hidden_NxD), jax.lax.stop_gradient(ref_w_DxV)
  out = _stats(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, float(temperature), blocks, bool(interpret))
  return TokenStats(**out)
