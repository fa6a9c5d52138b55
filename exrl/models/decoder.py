"""A pure functional decoder for the Llama / Qwen2 / Qwen3 families.

Params are a plain dict pytree with the layers stacked on a leading axis (scanned), and
`param_axes(config)` gives the logical axis names of every leaf for sharding.

Shape suffixes: B batch, T query length, S key/cache length, D hidden, H query heads,
K kv heads, G = H // K, E head dim, F mlp width, V vocab, L layers.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from exrl.models.config import ModelConfig

_MASK_VALUE = -1e30  # finite, so a fully padded query row averages instead of giving NaN.

# ----------------------------------------------------------------------------- params


def param_shapes(config: ModelConfig) -> dict:
  """Shapes of every param leaf, in the same pytree structure as the params."""
  c = config
  L, D, H, K, E, F, V = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                         c.intermediate_size, c.vocab_size)
  layers = {
      "attn_norm": (L, D), "wq": (L, D, H, E), "wk": (L, D, K, E), "wv": (L, D, K, E),
      "wo": (L, H, E, D), "mlp_norm": (L, D), "w_gate": (L, D, F), "w_up": (L, D, F),
      "w_down": (L, F, D),
  }
  if c.qkv_bias:
    layers.update(bq=(L, H, E), bk=(L, K, E), bv=(L, K, E))
  if c.o_bias:
    layers.update(bo=(L, D))
  if c.qk_norm:
    layers.update(q_norm=(L, E), k_norm=(L, E))
  shapes = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
  if not c.tie_word_embeddings:
    shapes["lm_head"] = (D, V)
  return shapes


_LAYER_AXES = {
    "attn_norm": ("layers", "embed"), "mlp_norm": ("layers", "embed"),
    "wq": ("layers", "embed", "heads", "head_dim"), "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"), "wo": ("layers", "heads", "head_dim", "embed"),
    "bq": ("layers", "heads", "head_dim"), "bk": ("layers", "kv_heads", "head_dim"),
    "bv": ("layers", "kv_heads", "head_dim"), "bo": ("layers", "embed"),
    "q_norm": ("layers", "head_dim"), "k_norm": ("layers", "head_dim"),
    "w_gate": ("layers", "embed", "mlp"), "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
}


def param_axes(config: ModelConfig) -> dict:
  """Logical axis names for every param leaf (a pytree of tuples matching `param_shapes`)."""
  shapes = param_shapes(config)
  axes = {"embed": ("vocab", "embed"), "final_norm": ("embed",),
          "layers": {k: _LAYER_AXES[k] for k in shapes["layers"]}}
  if "lm_head" in shapes:
    axes["lm_head"] = ("embed", "vocab")
  return axes


def init_params(config: ModelConfig, key: jax.Array, std: float = 0.02) -> dict:
  """Random init like HF (normal(std) weights, zero biases, unit norms), in `param_dtype`."""
  shapes = param_shapes(config)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
  keys = jax.random.split(key, len(leaves))
  out = []
  for path, shape, k in zip(paths, leaves, keys):
    if "norm" in path:
      x = jnp.ones(shape)
    elif "'b" in path:  # biases bq/bk/bv/bo
      x = jnp.zeros(shape)
    else:
      x = std * jax.random.normal(k, shape)
    out.append(x.astype(config.pdtype))
  return jax.tree.unflatten(treedef, out)


def unembed_matrix(config: ModelConfig, params: dict) -> jax.Array:
  """The LM head as w_DxV (the transposed embedding when tied)."""
  return params["embed"].T if config.tie_word_embeddings else params["lm_head"]


# ----------------------------------------------------------------------------- pieces


def rms_norm(x, weight, eps):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> jax.Array:
  """float32[E/2] inverse frequencies, with linear or llama3 scaling applied."""
  E = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, E, 2, dtype=jnp.float32) / E))
  s = config.rope_scaling_dict
  if config.rope_type == "linear":
    inv_freq = inv_freq / s["factor"]
  elif config.rope_type == "llama3":
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    inv_freq = jnp.where(medium, smoothed, scaled)
  return inv_freq


def apply_rope(x_BxTxNxE, positions_BxT, inv_freq):
  freqs_BxTxE2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq
  emb_BxTxE = jnp.concatenate([freqs_BxTxE2, freqs_BxTxE2], axis=-1)
  cos, sin = (f(emb_BxTxE)[:, :, None, :].astype(x_BxTxNxE.dtype) for f in (jnp.cos, jnp.sin))
  x1, x2 = jnp.split(x_BxTxNxE, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_BxTxNxE * cos + rotated * sin


def _attention(q_BxTxHxE, k_BxKxSxE, v_BxKxSxE, allowed_BxTxS):
  # k/v kv-head-major so the score and value matmuls batch over (B, K) with no transposes.
  B, T, H, E = q_BxTxHxE.shape
  K = k_BxKxSxE.shape[1]
  q_BxTxKxGxE = q_BxTxHxE.reshape(B, T, K, H // K, E)
  if T == 1:
    # One decode query: multiply-and-reduce fuses into a loop; B*K tiny batched matmuls are slow on CPU.
    q_BxKxGxE = q_BxTxKxGxE[:, 0].astype(jnp.float32)
    scores = jnp.sum(q_BxKxGxE[:, :, :, None, :] * k_BxKxSxE[:, :, None].astype(jnp.float32), axis=-1)
    scores = jnp.where(allowed_BxTxS[:, None], scores, _MASK_VALUE) / math.sqrt(E)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.sum(probs[..., None] * v_BxKxSxE[:, :, None].astype(jnp.float32), axis=-2)
    return out.astype(v_BxKxSxE.dtype).reshape(B, 1, H, E)
  scores = jnp.einsum("btkge,bkse->bkgts", q_BxTxKxGxE, k_BxKxSxE,
                      preferred_element_type=jnp.float32) / math.sqrt(E)
  scores = jnp.where(allowed_BxTxS[:, None, None], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKxSxE.dtype)
  out = jnp.einsum("bkgts,bkse->btkge", probs, v_BxKxSxE)
  return out.reshape(B, T, H, E)


def _layer(config, p, x_BxTxD, positions_BxT, inv_freq, kv_fn):
  """One block. `kv_fn(k_BxKxTxE, v_BxKxTxE) -> (k_all, v_all, allowed_BxTxS, cache_out)` wires in the cache."""
  dt = config.dtype
  cast = lambda name: p[name].astype(dt)
  h = rms_norm(x_BxTxD, p["attn_norm"], config.rms_norm_eps)
  q = jnp.einsum("btd,dhe->bthe", h, cast("wq"))
  k = jnp.einsum("btd,dke->btke", h, cast("wk"))
  v = jnp.einsum("btd,dke->btke", h, cast("wv"))
  if config.qkv_bias:
    q, k, v = q + cast("bq"), k + cast("bk"), v + cast("bv")
  if config.qk_norm:
    q = rms_norm(q, p["q_norm"], config.rms_norm_eps)
    k = rms_norm(k, p["k_norm"], config.rms_norm_eps)
  q = apply_rope(q, positions_BxT, inv_freq)
  k = apply_rope(k, positions_BxT, inv_freq)
  k_all, v_all, allowed_BxTxS, cache_out = kv_fn(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
  attn = _attention(q, k_all, v_all, allowed_BxTxS)
  out = jnp.einsum("bthe,hed->btd", attn, cast("wo"))
  if config.o_bias:
    out = out + cast("bo")
  x_BxTxD = x_BxTxD + out
  h = rms_norm(x_BxTxD, p["mlp_norm"], config.rms_norm_eps)
  gate = jnp.einsum("btd,df->btf", h, cast("w_gate"))
  up = jnp.einsum("btd,df->btf", h, cast("w_up"))
  x_BxTxD = x_BxTxD + jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, cast("w_down"))
  return x_BxTxD, cache_out


def default_positions(valid_BxT: jax.Array) -> jax.Array:
  """Positions that skip padding: 0,1,2,... over valid tokens (pads repeat a neighbour's)."""
  return jnp.maximum(jnp.cumsum(valid_BxT.astype(jnp.int32), axis=1) - 1, 0)


# ----------------------------------------------------------------------------- forward


def hidden_states(config: ModelConfig, params: dict, tokens_BxT: jax.Array,
                  valid_BxT: jax.Array | None = None, positions_BxT: jax.Array | None = None,
                  *, remat: bool = False) -> jax.Array:
  """Final-normed hidden states float[B, T, D] in `compute_dtype` (no cache; the train path).

  valid_BxT marks real tokens (False on left or right padding); attention is causal and never
  looks at padding. positions default to the count of valid tokens before each one.
  """
  B, T = tokens_BxT.shape
  if valid_BxT is None:
    valid_BxT = jnp.ones((B, T), bool)
  if positions_BxT is None:
    positions_BxT = default_positions(valid_BxT)
  causal_TxT = jnp.tril(jnp.ones((T, T), bool))
  allowed_BxTxT = causal_TxT[None] & valid_BxT[:, None, :]
  inv_freq = rope_inv_freq(config)
  x = params["embed"].astype(config.dtype)[tokens_BxT]

  def body(x, p):
    y, _ = _layer(config, p, x, positions_BxT, inv_freq, lambda k, v: (k, v, allowed_BxTxT, None))
    return y, None

  if remat:
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
  x, _ = jax.lax.scan(body, x, params["layers"])
  return rms_norm(x, params["final_norm"], config.rms_norm_eps)


def logits(config: ModelConfig, params: dict, tokens_BxT: jax.Array,
           valid_BxT: jax.Array | None = None, positions_BxT: jax.Array | None = None) -> jax.Array:
  """float32[B, T, V] logits. A convenience: training uses `hidden_states` + kernels.token_stats."""
  h = hidden_states(config, params, tokens_BxT, valid_BxT, positions_BxT)
  return project(config, params, h)


def project(config: ModelConfig, params: dict, hidden_BxTxD: jax.Array) -> jax.Array:
  """hidden → float32 logits through the (possibly tied) LM head, with fp32 accumulation."""
  w_DxV = unembed_matrix(config, params).astype(config.dtype)
  return jnp.einsum("...d,dv->...v", hidden_BxTxD, w_DxV, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- KV cache


def init_cache(config: ModelConfig, batch: int, max_len: int, *, per_layer: bool = False) -> dict:
  """An empty cache: k/v [L, B, K, S, E] in compute dtype and valid_BxS marking filled slots.

  per_layer=True keeps k/v as tuples of L arrays [B, K, S, E]: `decode_step` then unrolls the
  layers and updates each array in place, which avoids per-step cache slicing/copies in a
  decode loop (pair it with `unstack_layers(params)`).
  """
  shape = (batch, config.num_kv_heads, max_len, config.head_dim)
  if per_layer:
    k = tuple(jnp.zeros(shape, config.dtype) for _ in range(config.num_layers))
    v = tuple(jnp.zeros(shape, config.dtype) for _ in range(config.num_layers))
  else:
    k = jnp.zeros((config.num_layers, *shape), config.dtype)
    v = jnp.zeros((config.num_layers, *shape), config.dtype)
  return {"k": k, "v": v, "valid": jnp.zeros((batch, max_len), bool)}


def unstack_layers(params: dict) -> dict:
  """params with "layers" split into a tuple of per-layer dicts (for unrolled decoding)."""
  L = jax.tree.leaves(params["layers"])[0].shape[0]
  return {**params, "layers": tuple(jax.tree.map(lambda a, l=l: a[l], params["layers"]) for l in range(L))}


def decode_step(config: ModelConfig, params: dict, tokens_BxT: jax.Array, positions_BxT: jax.Array,
                valid_BxT: jax.Array, cache: dict, index: jax.Array) -> tuple[jax.Array, dict]:
  """Run T new tokens written at cache slots [index, index+T); returns (hidden_BxTxD, cache).

  All rows share slot numbering (prompts are left-padded), so a query at slot i sees the
  valid slots <= i. params["layers"] may be stacked (scanned) or a tuple from `unstack_layers`;
  the cache may be stacked or per-layer (`init_cache(per_layer=True)`, layers unrolled).
  """
  B, T = tokens_BxT.shape
  S = cache["valid"].shape[1]
  valid_BxS = jax.lax.dynamic_update_slice(cache["valid"], valid_BxT, (0, index))
  slots_T = index + jnp.arange(T)
  allowed_BxTxS = (jnp.arange(S)[None, :] <= slots_T[:, None])[None] & valid_BxS[:, None, :]
  inv_freq = rope_inv_freq(config)
  x = params["embed"].astype(config.dtype)[tokens_BxT]

  def layer(x, p, k_cache, v_cache):
    def kv_fn(k, v):
      k_all = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, index, 0))
      v_all = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, index, 0))
      return k_all, v_all, allowed_BxTxS, (k_all, v_all)

    return _layer(config, p, x, positions_BxT, inv_freq, kv_fn)

  if isinstance(cache["k"], (tuple, list)):
    layers = params["layers"]
    k_new, v_new = [], []
    for l in range(config.num_layers):
      p = layers[l] if isinstance(layers, (tuple, list)) else jax.tree.map(lambda a: a[l], layers)
      x, (k_l, v_l) = layer(x, p, cache["k"][l], cache["v"][l])
      k_new.append(k_l)
      v_new.append(v_l)
    k_new, v_new = tuple(k_new), tuple(v_new)
  else:
    if isinstance(params["layers"], (tuple, list)):
      raise ValueError("unstacked params need a per-layer cache: init_cache(..., per_layer=True)")
    x, (k_new, v_new) = jax.lax.scan(lambda x, a: layer(x, *a), x,
                                     (params["layers"], cache["k"], cache["v"]))
  h = rms_norm(x, params["final_norm"], config.rms_norm_eps)
  return h, {"k": k_new, "v": v_new, "valid": valid_BxS}
