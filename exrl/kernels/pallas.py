"""Pallas (TPU) token statistics: a grid over token blocks × vocab blocks, online logsumexp held in VMEM scratch.

Forward: grid (N/bn, V/bv) with semantics (parallel, arbitrary); each step computes a [bn, bv] logit tile on the MXU
and folds it into [bn, 1] accumulators (exrl/kernels/online.py); the last vocab step writes the stats.
Backward (custom_vjp), two kernels that recompute tiles: dhidden over grid (N/bn, V/bv) reducing over vocab, and
dW over grid (V/bv, N/bn) reducing over tokens, each accumulating in fp32 VMEM scratch.
Blocks respect the TPU (8, 128) tiling: bn % 8 == 0 and bv % 128 == 0 unless a block spans the whole axis. Ragged
edges are masked in-kernel (out-of-bounds tile contents are undefined), so nothing is padded in HBM.
Off TPU it runs in interpret mode (CPU tests); pass interpret=pltpu.InterpretParams() for TPU-semantics interpret.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from exrl.kernels import online
from exrl.kernels.stats import TokenStats, check_inputs

DEFAULT_BLOCK_N = 256
DEFAULT_BLOCK_V = 512
_STATS = ("logp", "lse", "entropy", "self_certainty")
_REF_STATS = ("kl", "ref_logp", "ref_lse")
_COEFS = ("lse", "ref_lse", "alpha", "beta", "gamma", "g_logp", "c")


def _tile(extent, block, align, name):
  """Clamp a block size to the axis and check the TPU tiling rule."""
  if block >= extent:
    return extent  # a block spanning the whole axis is always legal
  if block % align:
    raise ValueError(f"{name}={block} must be a multiple of {align} (TPU (8, 128) tiling) or >= the axis ({extent})")
  return block


def _params(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _masks(i_tok, j_voc, bn, bv, n, v, targets_Bx1):
  rows_BxV = i_tok * bn + jax.lax.broadcasted_iota(jnp.int32, (bn, bv), 0)
  cols_BxV = j_voc * bv + jax.lax.broadcasted_iota(jnp.int32, (bn, bv), 1)
  valid_BxV = (cols_BxV < v) & (rows_BxV < n)
  return valid_BxV, (cols_BxV == targets_Bx1) & valid_BxV


def _tile_logits(h_ref, w_ref, temperature):
  return jnp.dot(h_ref[...], w_ref[...], preferred_element_type=jnp.float32) / temperature


def _fwd_kernel(*refs, has_ref, n, v, bn, bv, temperature):
  n_in, n_out = (5, 7) if has_ref else (3, 4)
  ins, outs, accs = refs[:n_in], refs[n_in:n_in + n_out], refs[n_in + n_out:]
  h_ref, w_ref, t_ref = ins[:3]
  i, j = pl.program_id(0), pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    for acc, x in zip(accs, [x for x in online.init(bn, has_ref) if x is not None]):
      acc[...] = x

  valid, hit = _masks(i, j, bn, bv, n, v, t_ref[...])
  z = _tile_logits(h_ref, w_ref, temperature)
  zr = _tile_logits(ins[3], ins[4], temperature) if has_ref else None
  state = online.State(*[a[...] for a in accs])
  for acc, x in zip(accs, online.update(state, z, zr, valid, hit)):
    if x is not None:
      acc[...] = x

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    stats = online.finalize(online.State(*[a[...] for a in accs]), v)
    for out, name in zip(outs, _STATS + _REF_STATS):
      out[...] = stats[name]


def _coefs(coef_refs):
  return {k: r[...] for k, r in zip(_COEFS, coef_refs)}


def _dz(refs, has_ref, i_tok, j_voc, n, v, bn, bv, temperature):
  h_ref, w_ref, t_ref = refs[:3]
  rest = refs[3:]
  zr = None
  if has_ref:
    zr, rest = _tile_logits(rest[0], rest[1], temperature), rest[2:]
  valid, hit = _masks(i_tok, j_voc, bn, bv, n, v, t_ref[...])
  z = _tile_logits(h_ref, w_ref, temperature)
  return online.dz_block(z, zr, valid, hit, _coefs(rest)) / temperature


def _dh_kernel(*refs, has_ref, n, v, bn, bv, temperature):
  ins, dh_ref, acc_ref = refs[:-2], refs[-2], refs[-1]
  i, j = pl.program_id(0), pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  dz = _dz(ins, has_ref, i, j, n, v, bn, bv, temperature)
  w = ins[1][...].astype(jnp.float32)
  cols = j * bv + jax.lax.broadcasted_iota(jnp.int32, w.shape, 1)
  w = jnp.where(cols < v, w, 0.0)  # padded columns are undefined (NaN in interpret mode); 0 * NaN would leak
  acc_ref[...] += jax.lax.dot_general(dz, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _dw_kernel(*refs, has_ref, n, v, bn, bv, temperature):
  ins, dw_ref, acc_ref = refs[:-2], refs[-2], refs[-1]
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  dz = _dz(ins, has_ref, i, j, n, v, bn, bv, temperature)
  h = ins[0][...].astype(jnp.float32)
  rows = i * bn + jax.lax.broadcasted_iota(jnp.int32, h.shape, 0)
  h = jnp.where(rows < n, h, 0.0)  # padded rows are undefined
  acc_ref[...] += jax.lax.dot_general(h, dz, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

  @pl.when(i == pl.num_programs(1) - 1)
  def _finish():
    dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


def _in_specs(has_ref, d, d_ref, bn, bv, tok_vocab):
  """BlockSpecs for (hidden, w, targets[, ref_hidden, ref_w]); tok_vocab maps grid indices to (token, vocab)."""
  tok = lambda f: (lambda *g: f(*tok_vocab(*g)))
  specs = [pl.BlockSpec((bn, d), tok(lambda i, j: (i, 0))), pl.BlockSpec((d, bv), tok(lambda i, j: (0, j))),
           pl.BlockSpec((bn, 1), tok(lambda i, j: (i, 0)))]
  if has_ref:
    specs += [pl.BlockSpec((bn, d_ref), tok(lambda i, j: (i, 0))), pl.BlockSpec((d_ref, bv), tok(lambda i, j: (0, j)))]
  return specs


def _geometry(hidden_NxD, w_DxV, ref_hidden_NxD, block_n, block_v):
  (n, d), v = hidden_NxD.shape, w_DxV.shape[1]
  d_ref = ref_hidden_NxD.shape[1] if ref_hidden_NxD is not None else 0
  bn, bv = _tile(n, block_n, 8, "block_n"), _tile(v, block_v, 128, "block_v")
  return n, d, v, d_ref, bn, bv, pl.cdiv(n, bn), pl.cdiv(v, bv)


def _args(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV):
  args = [hidden_NxD, w_DxV, targets_N.astype(jnp.int32)[:, None]]
  return args + ([ref_hidden_NxD, ref_w_DxV] if ref_hidden_NxD is not None else [])


def _forward(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, block_n, block_v, interpret):
  has_ref = ref_hidden_NxD is not None
  n, d, v, d_ref, bn, bv, nt, nv = _geometry(hidden_NxD, w_DxV, ref_hidden_NxD, block_n, block_v)
  names = _STATS + (_REF_STATS if has_ref else ())
  n_acc = sum(x is not None for x in online.init(1, has_ref))
  kernel = functools.partial(_fwd_kernel, has_ref=has_ref, n=n, v=v, bn=bn, bv=bv, temperature=temperature)
  outs = pl.pallas_call(
      kernel, grid=(nt, nv),
      in_specs=_in_specs(has_ref, d, d_ref, bn, bv, lambda i, j: (i, j)),
      out_specs=[pl.BlockSpec((bn, 1), lambda i, j: (i, 0)) for _ in names],
      out_shape=[jax.ShapeDtypeStruct((n, 1), jnp.float32) for _ in names],
      scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32) for _ in range(n_acc)],
      compiler_params=_params("parallel", "arbitrary"), interpret=interpret, name="token_stats_fwd",
  )(*_args(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV))
  return {k: x[:, 0] for k, x in zip(names, outs)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _stats(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, block_n, block_v, interpret):
  return _forward(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, block_n, block_v, interpret)


def _stats_fwd(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, block_n, block_v, interpret):
  out = _forward(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, block_n, block_v, interpret)
  return out, (hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, out)


def _stats_bwd(temperature, block_n, block_v, interpret, res, g):
  hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, out = res
  has_ref = ref_hidden_NxD is not None
  n, d, v, d_ref, bn, bv, nt, nv = _geometry(hidden_NxD, w_DxV, ref_hidden_NxD, block_n, block_v)
  col = lambda x: None if x is None else x[:, None]
  coefs = online.grad_coefs(col(out["lse"]), col(out["entropy"]), col(out.get("kl")), col(out.get("ref_lse")),
                            col(g["logp"]), col(g["lse"]), col(g["entropy"]), col(g["self_certainty"]),
                            col(g.get("kl")), v)
  args = _args(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV) + [coefs[k] for k in _COEFS]
  static = dict(has_ref=has_ref, n=n, v=v, bn=bn, bv=bv, temperature=temperature)

  def specs(tok_vocab):
    coef = pl.BlockSpec((bn, 1), lambda *g: (tok_vocab(*g)[0], 0))
    return _in_specs(has_ref, d, d_ref, bn, bv, tok_vocab) + [coef] * len(_COEFS)

  dh_NxD = pl.pallas_call(
      functools.partial(_dh_kernel, **static), grid=(nt, nv), in_specs=specs(lambda i, j: (i, j)),
      out_specs=pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((n, d), hidden_NxD.dtype),
      scratch_shapes=[pltpu.VMEM((bn, d), jnp.float32)],
      compiler_params=_params("parallel", "arbitrary"), interpret=interpret, name="token_stats_dh",
  )(*args)
  dw_DxV = pl.pallas_call(
      functools.partial(_dw_kernel, **static), grid=(nv, nt), in_specs=specs(lambda j, i: (i, j)),
      out_specs=pl.BlockSpec((d, bv), lambda j, i: (0, j)),
      out_shape=jax.ShapeDtypeStruct((d, v), w_DxV.dtype),
      scratch_shapes=[pltpu.VMEM((d, bv), jnp.float32)],
      compiler_params=_params("parallel", "arbitrary"), interpret=interpret, name="token_stats_dw",
  )(*args)
  return dh_NxD, dw_DxV, None, None, None


_stats.defvjp(_stats_fwd, _stats_bwd)


def token_stats(hidden_NxD, w_DxV, targets_N, *, ref_hidden_NxD=None, ref_w_DxV=None, temperature=1.0,
                block_n=DEFAULT_BLOCK_N, block_v=DEFAULT_BLOCK_V, interpret=None):
  """TokenStats via the Pallas kernels; same contract as kernels.api.token_stats.

  block_n / block_v: token and vocab tile sizes (multiples of 8 / 128, or the whole axis).
  interpret: None runs compiled on TPU and in interpret mode elsewhere; True or pltpu.InterpretParams() force it.
  """
  check_inputs(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature)
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  if ref_hidden_NxD is not None:
    ref_hidden_NxD, ref_w_DxV = jax.lax.stop_gradient(ref_hidden_NxD), jax.lax.stop_gradient(ref_w_DxV)
  out = _stats(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, float(temperature), int(block_n),
               int(block_v), interpret)
  return TokenStats(**out)
