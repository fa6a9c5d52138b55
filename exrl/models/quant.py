"""Weight-only quantisation of the frozen base for LoRA / QLoRA: bf16, int8 and nf4 (QLoRA, arXiv:2305.14314).

A quantised projection `w` of a layer stack (float[L, *in, *out]) is stored as two leaves beside where `w` was,
so the decoder's modules find it by name (`modules._param` dequantises one layer at a time inside the scan):

  int8: w_int8 int8[L, *in, *out] and w_int8_scale float32[L, *1, *out] (symmetric, one scale per output
        channel: max |w| over the input axes / 127). Round-trip error per element <= scale / 2.
  nf4:  w_nf4 uint8[L, n/2] (two 4-bit codes per byte, low nibble first, n = the layer's element count padded
        to a multiple of NF4_BLOCK) and w_nf4_absmax float32[L, n/NF4_BLOCK]. Each block of NF4_BLOCK
        consecutive elements (row-major over *in, *out) is divided by its absmax and rounded to the nearest of
        the 16 NF4 levels. Round-trip error per element <= NF4_MAX_HALF_GAP * absmax of its block (0.1385).

Only the seven projection matrices are quantised, as in QLoRA; the embedding (also the tied LM head), norms and
biases stay in bf16, or in fp32 on XLA:CPU (`dense_dtype`), which casts a bf16 matrix read by a dot or sliced in a
loop to fp32 whole: the head's cast was an fp32-embedding-sized temp in the sampler, the scorer and the train step.
Unlike bitsandbytes, the absmax is kept in float32 (no double quantisation: it is 1/16 of a byte per weight) and
dequantisation is plain XLA (no fused 4-bit matmul), so int8/nf4 save memory, not time.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BASE_DTYPES = ("float32", "bfloat16", "int8", "nf4")
PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
N_IN = {"wo": 2}  # input axes of each projection (default 1): wo is [H, E, D]

# The 16 NF4 levels of QLoRA (arXiv:2305.14314, appendix E; bitsandbytes' table), ascending.
NF4_LEVELS = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                       0.7229568362236023, 1.0], np.float32)
NF4_BLOCK = 64
NF4_MAX_HALF_GAP = float(np.max(np.diff(NF4_LEVELS)) / 2)  # 0.1385: (1 - 0.7230) / 2


# ----------------------------------------------------------------------------- int8


def int8_quantize(w, n_in: int = 1) -> tuple[jax.Array, jax.Array]:
  """w float[L, *in, *out] -> (int8 codes of w's shape, float32 scale [L, *1, *out]: the in axes kept as 1)."""
  w32 = jnp.asarray(w, jnp.float32)
  scale = jnp.max(jnp.abs(w32), axis=tuple(range(1, 1 + n_in)), keepdims=True) / 127.0
  scale = jnp.where(scale == 0, 1.0, scale)
  q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
  return q, scale


def int8_dequantize(q, scale, dtype) -> jax.Array:
  """Codes [(L,) *in, *out] and scale [(L,) *1, *out] -> float [(L,) *in, *out] in `dtype`."""
  return (q.astype(jnp.float32) * scale).astype(dtype)


# ----------------------------------------------------------------------------- nf4


def nf4_quantize(w) -> tuple[jax.Array, jax.Array]:
  """w float[L, ...] -> (uint8[L, n/2] packed codes, float32[L, n/NF4_BLOCK] block absmax)."""
  L = w.shape[0]
  flat = jnp.asarray(w, jnp.float32).reshape(L, -1)
  n = flat.shape[1]
  pad = -n % NF4_BLOCK
  flat = jnp.pad(flat, ((0, 0), (0, pad)))
  blocks = flat.reshape(L, -1, NF4_BLOCK)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None]
  # Nearest level: midpoints between adjacent levels split the [-1, 1] range.
  mids = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
  codes = jnp.searchsorted(mids, normed.reshape(L, -1)).astype(jnp.uint8)
  packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
  return packed, absmax


def nf4_dequantize(packed, absmax, shape: tuple[int, ...], dtype) -> jax.Array:
  """Packed codes [..., n/2] and absmax [..., n/B] -> float[..., *shape] in `dtype` (leading axes kept)."""
  lead = packed.shape[:-1]
  codes = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*lead, -1)
  values = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)].reshape(*lead, -1, NF4_BLOCK) * absmax[..., None]
  n = int(np.prod(shape))
  return values.reshape(*lead, -1)[..., :n].reshape(*lead, *shape).astype(dtype)


# ----------------------------------------------------------------------------- param trees


def dense_dtype() -> jnp.dtype:
  """What int8 / nf4 bases hold their unquantised leaves in: fp32 on XLA:CPU (no bf16 dot or dynamic-slice
  there: a bf16 embedding costs an fp32 copy of it in every jitted function that reads the head), else bf16."""
  return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


def quantize_base(params: dict, base_dtype: str, dense: jnp.dtype | None = None) -> dict:
  """The frozen base as `base_dtype`: float32 (as given), bfloat16 (every leaf), int8 / nf4 (projections
  quantised, everything else in `dense`, default `dense_dtype()`). Returns a new dict; the caller's arrays are
  not modified."""
  if base_dtype not in BASE_DTYPES:
    raise ValueError(f"base_dtype={base_dtype!r}; valid: {BASE_DTYPES}")
  if base_dtype == "float32":
    return params
  rest = lambda x: x.astype(jnp.bfloat16 if base_dtype == "bfloat16" else (dense or dense_dtype()))
  out = {k: jax.tree.map(rest, v) for k, v in params.items() if k != "layers"}
  layers = {}
  for name, w in params["layers"].items():
    if base_dtype == "bfloat16" or name not in PROJECTIONS:
      layers[name] = rest(w)
    elif base_dtype == "int8":
      layers[f"{name}_int8"], layers[f"{name}_int8_scale"] = _by_layer(_int8_jit, w, N_IN.get(name, 1))
    else:
      layers[f"{name}_nf4"], layers[f"{name}_nf4_absmax"] = _by_layer(_nf4_jit, w)
  out["layers"] = layers
  return out


_int8_jit = jax.jit(int8_quantize, static_argnums=1)
_nf4_jit = jax.jit(nf4_quantize)


def _by_layer(fn, w, *args) -> tuple[jax.Array, ...]:
  """fn(w[l:l+1], *args) for each layer l, joined: the fp32 temporaries of one layer at a time (a whole 0.5B MLP
  stack at once: int8 0.4 GB, nf4 2.4 GB of XLA temp)."""
  parts = [fn(w[l:l + 1], *args) for l in range(w.shape[0])]
  return tuple(jnp.concatenate(p) for p in zip(*parts))


def dequantize_base(params: dict, shapes: dict, dtype=jnp.float32) -> dict:
  """The inverse of `quantize_base` up to rounding: every leaf float in `dtype`, the decoder's own tree.
  shapes: `decoder.param_shapes(config)`."""
  out = {k: jax.tree.map(lambda x: x.astype(dtype), v) for k, v in params.items() if k != "layers"}
  layers = {}
  for name, shape in shapes["layers"].items():
    lay = params["layers"]
    if name in lay:
      layers[name] = lay[name].astype(dtype)
    elif f"{name}_int8" in lay:
      layers[name] = int8_dequantize(lay[f"{name}_int8"], lay[f"{name}_int8_scale"], dtype)
    else:
      layers[name] = nf4_dequantize(lay[f"{name}_nf4"], lay[f"{name}_nf4_absmax"], shape[1:], dtype)
  out["layers"] = layers
  return out


def quantized_axes(params: dict, axes: dict) -> dict:
  """Logical axes for a `quantize_base` tree, from the decoder's `param_axes` (codes keep w's axes, int8 scales
  its output axes; nf4's flat leaves are replicated but for the layer axis)."""
  layers = {}
  for name, leaf_axes in axes["layers"].items():
    if name in params["layers"]:
      layers[name] = leaf_axes
    elif f"{name}_int8" in params["layers"]:
      layers[f"{name}_int8"] = leaf_axes
      n_in = N_IN.get(name, 1)
      layers[f"{name}_int8_scale"] = (leaf_axes[0], *[None] * n_in, *leaf_axes[1 + n_in:])
    else:
      layers[f"{name}_nf4"] = layers[f"{name}_nf4_absmax"] = (leaf_axes[0], None)
  return {**{k: v for k, v in axes.items() if k != "layers"}, "layers": layers}


def stored(module, name: str, shape: tuple[int, ...], dtype):
  """Inside a flax module: the dequantised weight `name` of one layer (shape w/o the layer axis) in `dtype`
  if the params hold it quantised, else None."""
  if module.has_variable("params", f"{name}_int8"):
    q, scale = module.get_variable("params", f"{name}_int8"), module.get_variable("params", f"{name}_int8_scale")
    return int8_dequantize(q, scale, dtype)
  if module.has_variable("params", f"{name}_nf4"):
    packed, absmax = module.get_variable("params", f"{name}_nf4"), module.get_variable("params", f"{name}_nf4_absmax")
    return nf4_dequantize(packed, absmax, shape, dtype)
  return None
