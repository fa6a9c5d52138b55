"""The functional API over the Flax `Decoder` (exrl/models/modules.py): every function here is a thin wrapper
around `Decoder(config).apply({"params": params}, ...)`.

Params are a plain dict pytree with the layers stacked on a leading axis (nn.scan); `param_axes(config)` gives
the logical axis names that the modules attach to every leaf, for sharding.

Shape suffixes: B batch, T query length, S key/cache length, D hidden, H query heads,
K kv heads, G = H // K, E head dim, F mlp width, V vocab, L layers.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from exrl.models.config import ModelConfig
from exrl.models.modules import (Block, Decoder, apply_rope, attend, cache_mask, causal_mask,  # noqa: F401
                                 default_positions, rms_norm, rope_inv_freq, rope_tables)

# ----------------------------------------------------------------------------- params


@functools.lru_cache(maxsize=64)
def _abstract_params(config: ModelConfig) -> dict:
  """The Decoder's params as ShapeDtypeStructs, still boxed with their logical-axis metadata (no compute)."""
  init = lambda key: Decoder(config).init(key, jnp.zeros((1, 1), jnp.int32))["params"]
  return jax.eval_shape(init, jax.random.key(0))


def _is_box(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def param_shapes(config: ModelConfig) -> dict:
  """Shapes of every param leaf (tuples), in the same pytree structure as the params."""
  return jax.tree.map(lambda b: tuple(b.value.shape), _abstract_params(config), is_leaf=_is_box)


def param_axes(config: ModelConfig) -> dict:
  """Logical axis names for every param leaf (tuples matching `param_shapes`), read from the modules'
  `nn.with_logical_partitioning` metadata; the scanned layer axis is "layers"."""
  return jax.tree.map(lambda b: tuple(b.names), _abstract_params(config), is_leaf=_is_box)


def init_params(config: ModelConfig, key: jax.Array, std: float = 0.02) -> dict:
  """Random init like HF (normal(std) weights, zero biases, unit norms), in `param_dtype`, as a plain dict.

  The tree is the Decoder's; the values keep exrl's historical key assignment (one split per leaf in tree
  order), so a seed gives the same model as before the Flax port. `Decoder(config).init` draws the same
  distributions with Flax's per-path keys (and boxed leaves: `nn.unbox` them).
  """
  shapes = param_shapes(config)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(flat))
  out = []
  for (path, shape), k in zip(flat, keys):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      x = jnp.ones(shape)
    elif "'b" in name:  # biases bq/bk/bv/bo
      x = jnp.zeros(shape)
    else:
      x = std * jax.random.normal(k, shape)
    out.append(x.astype(config.pdtype))
  return jax.tree.unflatten(treedef, out)


def _top(params: dict) -> dict:
  """The non-layer params: what the embedding, final norm and LM head need."""
  return {k: v for k, v in params.items() if k != "layers"}


def unembed_matrix(config: ModelConfig, params: dict) -> jax.Array:
  """The LM head as w_DxV (the transposed embedding when tied)."""
  return Decoder(config).apply({"params": _top(params)}, method=Decoder.unembed)


# ----------------------------------------------------------------------------- forward


def hidden_states(config: ModelConfig, params: dict, tokens_BxT: jax.Array,
                  valid_BxT: jax.Array | None = None, positions_BxT: jax.Array | None = None,
                  segment_BxT: jax.Array | None = None, *, remat: bool | str = False) -> jax.Array:
  """Final-normed hidden states float[B, T, D] in `compute_dtype` (no cache; the train path).

  valid_BxT marks real tokens (False on left or right padding); attention is causal and never
  looks at padding. positions default to the count of valid tokens before each one. segment_BxT (int, packed
  rows: several sequences side by side, see exrl.train.packing) keeps attention within each segment. remat=True
  recomputes each block in the backward pass (policy "nothing_saveable"); a string names another
  `jax.checkpoint_policies` policy.
  """
  policy = "nothing_saveable" if remat is True else (remat or None)
  model = Decoder(config, remat_policy=policy)
  return model.apply({"params": params}, tokens_BxT, valid_BxT, positions_BxT, segment_BxT)


def logits(config: ModelConfig, params: dict, tokens_BxT: jax.Array,
           valid_BxT: jax.Array | None = None, positions_BxT: jax.Array | None = None) -> jax.Array:
  """float32[B, T, V] logits. A convenience: training uses `hidden_states` + kernels.token_stats."""
  h = hidden_states(config, params, tokens_BxT, valid_BxT, positions_BxT)
  return project(config, params, h)


def project(config: ModelConfig, params: dict, hidden_BxTxD: jax.Array) -> jax.Array:
  """hidden → float32 logits through the (possibly tied) LM head, with fp32 accumulation."""
  return Decoder(config).apply({"params": _top(params)}, hidden_BxTxD, method=Decoder.logits)


# ----------------------------------------------------------------------------- KV cache


def init_cache(config: ModelConfig, batch: int, max_len: int, *, per_layer: bool = False) -> dict:
  """An empty cache in compute dtype: k [L, B, K, E, S] (keys transposed), v [L, B, K, S, E], and valid_BxS
  marking filled slots.

  per_layer=True keeps k/v as tuples of L arrays (k [B, K, E, S], v [B, K, S, E]): `decode_step` then unrolls the
  layers and updates each array in place, which avoids per-step cache slicing/copies in a
  decode loop (pair it with `unstack_layers(params)`).
  """
  v_shape = (batch, config.num_kv_heads, max_len, config.head_dim)
  k_shape = (batch, config.num_kv_heads, config.head_dim, max_len)  # keys transposed: see modules.attend_cached
  if per_layer:
    k = tuple(jnp.zeros(k_shape, config.dtype) for _ in range(config.num_layers))
    v = tuple(jnp.zeros(v_shape, config.dtype) for _ in range(config.num_layers))
  else:
    k = jnp.zeros((config.num_layers, *k_shape), config.dtype)
    v = jnp.zeros((config.num_layers, *v_shape), config.dtype)
  return {"k": k, "v": v, "valid": jnp.zeros((batch, max_len), bool)}


def unstack_layers(params: dict) -> dict:
  """params with "layers" split into a tuple of per-layer dicts (for unrolled decoding)."""
  L = jax.tree.leaves(params["layers"])[0].shape[0]
  return {**params, "layers": tuple(jax.tree.map(lambda a, l=l: a[l], params["layers"]) for l in range(L))}


def decode_step(config: ModelConfig, params: dict, tokens_BxT: jax.Array, positions_BxT: jax.Array,
                valid_BxT: jax.Array, cache: dict, index: jax.Array, causal: bool = True) -> tuple[jax.Array, dict]:
  """Run T new tokens written at cache slots [index, index+T); returns (hidden_BxTxD, cache).

  All rows share slot numbering (prompts are left-padded), so a query at slot i sees the
  valid slots <= i. causal=False: it sees every valid slot (the continuous engine writes one token per
  row at a ring column, so a row's earlier tokens may sit past it; it keeps unwritten slots invalid).
  params["layers"] may be stacked (scanned) or a tuple from `unstack_layers`;
  the cache may be stacked or per-layer (`init_cache(per_layer=True)`, layers unrolled).
  """
  if not isinstance(cache["k"], (tuple, list)):
    if isinstance(params["layers"], (tuple, list)):
      raise ValueError("unstacked params need a per-layer cache: init_cache(..., per_layer=True)")
    return _decode_scanned(config, params, tokens_BxT, positions_BxT, valid_BxT, cache, index, causal)
  # Unrolled: each layer's Block applied to its own params and cache arrays, so nothing is sliced per step.
  model, block, top = Decoder(config), Block(config), {"params": _top(params)}
  layers = params["layers"]
  valid_BxS, allowed_BxTxS = cache_mask(cache["valid"], valid_BxT, index, causal)
  x_BxTxD = model.apply(top, tokens_BxT, method=Decoder.embed_tokens)
  rope = model.apply(top, positions_BxT, method=Decoder.rope)
  k_new, v_new = [], []
  for l in range(config.num_layers):
    p = layers[l] if isinstance(layers, (tuple, list)) else jax.tree.map(lambda a: a[l], layers)
    x_BxTxD, (k_l, v_l) = block.apply({"params": p}, x_BxTxD, rope, allowed_BxTxS,
                                      (cache["k"][l], cache["v"][l]), index)
    k_new.append(k_l)
    v_new.append(v_l)
  h_BxTxD = model.apply(top, x_BxTxD, method=Decoder.normalize)
  return h_BxTxD, {"k": tuple(k_new), "v": tuple(v_new), "valid": valid_BxS}


def _decode_scanned(config: ModelConfig, params: dict, tokens_BxT, positions_BxT, valid_BxT, cache: dict, index,
                    causal: bool = True):
  """`decode_step` over stacked params and a stacked cache: a lax.scan over the layers (the sampler's path).

  Each step slices one layer's weights at a time; `unstack_layers` inside a jitted decode loop is a copy of
  every layer weight plus its hoisted q-k-v / gate-up joins (XLA temp of the sampler on a 4-layer slice of
  Qwen2.5-0.5B's layout, 16 rows x 192 slots: 932 MB unstacked, 638 MB scanned, 119 MB scanned with the
  head untransposed). On XLA:CPU a bf16 stack is still cast to fp32 whole (dynamic-slice has no bf16
  kernel there), so a bf16 base saves no sampler memory on CPU; int8 / nf4 do.
  """
  model, block, top = Decoder(config), Block(config), {"params": _top(params)}
  valid_BxS, allowed_BxTxS = cache_mask(cache["valid"], valid_BxT, index, causal)
  x_BxTxD = model.apply(top, tokens_BxT, method=Decoder.embed_rows)
  rope = model.apply(top, positions_BxT, method=Decoder.rope)

  def layer(x_BxTxD, xs):
    p, k_l, v_l = xs
    x_BxTxD, (k_l, v_l) = block.apply({"params": p}, x_BxTxD, rope, allowed_BxTxS, (k_l, v_l), index)
    return x_BxTxD, (k_l, v_l)

  x_BxTxD, (k, v) = jax.lax.scan(layer, x_BxTxD, (params["layers"], cache["k"], cache["v"]))
  h_BxTxD = model.apply(top, x_BxTxD, method=Decoder.normalize)
  return h_BxTxD, {"k": k, "v": v, "valid": valid_BxS}
