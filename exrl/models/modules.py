"""The Llama / Qwen2 / Qwen3 decoder as flax.linen modules, used purely: `Decoder(config).apply({"params": p}, ...)`.

  Decoder
    embed       [V, D]           token embedding (transposed, also the tied LM head)
    layers      nn.scan(Block)   L blocks, every param stacked on a leading "layers" axis
      attn_norm   RMSNorm [D]
      Attention   wq [D,H,E] wk,wv [D,K,E] wo [H,E,D]; bq,bk,bv (Qwen2) bo (Llama bias) q_norm,k_norm [E] (Qwen3)
      mlp_norm    RMSNorm [D]
      Mlp         w_gate,w_up [D,F] w_down [F,D]    (SwiGLU)
    final_norm  RMSNorm [D]
    lm_head     [D, V]           untied models only

Submodules share their parent's scope (`nn.share_scope`), so `params` is a plain dict with HF-like flat names
(params["layers"]["wq"] is float[L, D, H, E]): the layout exrl checkpoints and `hf.py` have always used. Every
param carries its logical axes (`nn.with_logical_partitioning`); `decoder.param_axes` reads them for sharding.
The KV cache is an argument and a result, never a mutable collection, so decoding is a pure function inside
the sampler's `while_loop`.

Shape suffixes: B batch, T query length, S key/cache length, D hidden, H query heads, K kv heads,
G = H // K, E head dim, F mlp width, V vocab, L layers.
"""
from __future__ import annotations

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from exrl.models import quant
from exrl.models.config import ModelConfig

_MASK_VALUE = -1e30  # finite, so a fully padded query row averages instead of giving NaN.
KVCache = tuple  # (k_BxKxExS, v_BxKxSxE) of one layer (keys transposed), or [L, ...] stacked inside the scan


def dense(x, w, n_in: int = 1) -> jax.Array:
  """Contract x's last `n_in` axes with w's first `n_in`, as one 2-D matmul over all leading axes of x.

  A contraction written over two batch-like axes (b, t) makes XLA:CPU materialise a transposed copy of the
  activations for each weight gradient; flattened to rows first, the RL update ran 1.5x faster.
  """
  in_size = math.prod(w.shape[:n_in])
  y = x.reshape(-1, in_size) @ w.reshape(in_size, -1)
  return y.reshape(*x.shape[:x.ndim - n_in], *w.shape[n_in:])


def dense_fused(x, ws: list) -> list:
  """[dense(x, w) for w in ws]; for one decode token (T = 1) as one matmul over the weights joined on their
  first output axis.

  In a decode loop the join is loop-invariant (XLA hoists it out), and one matmul is cheaper than two or three
  small ones (each a separate library call on CPU). With more tokens the separate products are kept: the join
  would be a per-step copy of the weights, and its gradient another.
  """
  if x.ndim < 2 or x.shape[-2] != 1 or len(ws) == 1:
    return [dense(x, w) for w in ws]
  y = dense(x, jnp.concatenate(ws, axis=1))
  bounds = list(itertools.accumulate(w.shape[1] for w in ws))[:-1]
  return jnp.split(y, bounds, axis=x.ndim - 1)


def _param(module: nn.Module, name: str, init, axes: tuple[str, ...], shape: tuple[int, ...]) -> jax.Array:
  """A param in `param_dtype` that carries its logical axis names; a base quantised for QLoRA
  (`exrl.models.quant`) is dequantised here, one layer at a time, in compute dtype."""
  w = quant.stored(module, name, shape, module.config.dtype)
  if w is not None:
    return w
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, module.config.pdtype)


def _adapted(module: nn.Module, x, ys: list, names: tuple[str, ...], n_in: int = 1) -> list:
  """ys[i] + (x @ A) @ B for each projection names[i] whose LoRA leaves `{name}_lora_a` [*in, r] and
  `{name}_lora_b` [*r, out] are in the params (`exrl.models.lora`; B carries the alpha / r scale)."""
  dt = module.config.dtype
  out = []
  for y, name in zip(ys, names):
    if module.has_variable("params", f"{name}_lora_a"):
      a, b = (module.get_variable("params", f"{name}_lora_{s}").astype(dt) for s in "ab")
      y = y + dense(dense(x, a, n_in), b)
    out.append(y)
  return out


# ----------------------------------------------------------------------------- functions


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


def rope_tables(positions_BxT, inv_freq_E2, dtype) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) [B, T, 1, E] of each token's rotation angles, computed once per forward and shared by all layers."""
  freqs_BxTxE2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq_E2
  emb_BxTxE = jnp.concatenate([freqs_BxTxE2, freqs_BxTxE2], axis=-1)
  return tuple(f(emb_BxTxE)[:, :, None, :].astype(dtype) for f in (jnp.cos, jnp.sin))


def apply_rope(x_BxTxNxE, rope):
  """Rotate each head's (first half, second half) pairs by the angles in `rope = rope_tables(...)`."""
  cos_BxTx1xE, sin_BxTx1xE = rope
  x1, x2 = jnp.split(x_BxTxNxE, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_BxTxNxE * cos_BxTx1xE + rotated * sin_BxTx1xE


def attend(q_BxTxHxE, k_BxKxSxE, v_BxKxSxE, allowed_BxTxS):
  """Softmax attention of H query heads over K shared kv heads; masked keys get no weight (the no-cache path)."""
  # k/v kv-head-major so the score and value matmuls batch over (B, K) with no transposes.
  B, T, H, E = q_BxTxHxE.shape
  K = k_BxKxSxE.shape[1]
  q_BxTxKxGxE = q_BxTxHxE.reshape(B, T, K, H // K, E)
  scores = jnp.einsum("btkge,bkse->bkgts", q_BxTxKxGxE, k_BxKxSxE,
                      preferred_element_type=jnp.float32) / math.sqrt(E)
  return _weigh_values(scores, v_BxKxSxE, allowed_BxTxS)


def attend_cached(q_BxTxHxE, k_BxKxExS, v_BxKxSxE, allowed_BxTxS):
  """`attend` over a KV cache whose keys are stored transposed, [B, K, E, S].

  With S minor, a decode query's scores are a sum of E rows of the cache, which XLA:CPU vectorises along S;
  with E minor it was a horizontal reduction per slot (54 -> 20 us per layer at bench_sampler's shapes, in
  isolation).
  """
  B, T, H, E = q_BxTxHxE.shape
  K = k_BxKxExS.shape[1]
  if T == 1:
    # One decode query: multiply-and-reduce fuses into a loop; B*K tiny batched matmuls are slow on CPU.
    q_BxKxGxE = q_BxTxHxE.reshape(B, K, H // K, E).astype(jnp.float32)
    scores = jnp.sum(q_BxKxGxE[..., None] * k_BxKxExS[:, :, None].astype(jnp.float32), axis=-2)
    scores = jnp.where(allowed_BxTxS[:, None], scores, _MASK_VALUE) / math.sqrt(E)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.sum(probs[..., None] * v_BxKxSxE[:, :, None].astype(jnp.float32), axis=-2)
    return out.astype(v_BxKxSxE.dtype).reshape(B, 1, H, E)
  # A prefill, once per sample call: in float32, since XLA:CPU's dot for this layout has no bf16 x bf16 -> f32 kernel.
  scores = jnp.einsum("btkge,bkes->bkgts", q_BxTxHxE.reshape(B, T, K, H // K, E).astype(jnp.float32),
                      k_BxKxExS.astype(jnp.float32)) / math.sqrt(E)
  return _weigh_values(scores, v_BxKxSxE, allowed_BxTxS)


def _weigh_values(scores_BxKxGxTxS, v_BxKxSxE, allowed_BxTxS):
  """softmax over the allowed keys, then the weighted sum of values -> out_BxTxHxE."""
  B, K, G, T, _ = scores_BxKxGxTxS.shape
  scores = jnp.where(allowed_BxTxS[:, None, None], scores_BxKxGxTxS, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKxSxE.dtype)
  out = jnp.einsum("bkgts,bkse->btkge", probs, v_BxKxSxE)
  return out.reshape(B, T, K * G, v_BxKxSxE.shape[-1])


def default_positions(valid_BxT: jax.Array) -> jax.Array:
  """Positions that skip padding: 0,1,2,... over valid tokens (pads repeat a neighbour's)."""
  return jnp.maximum(jnp.cumsum(valid_BxT.astype(jnp.int32), axis=1) - 1, 0)


def causal_mask(valid_BxT: jax.Array, segment_BxT: jax.Array | None = None) -> jax.Array:
  """bool[B, T, T]: query t sees valid keys <= t (the no-cache path); with `segment_BxT` (packed rows), only
  keys of its own segment."""
  T = valid_BxT.shape[1]
  allowed_BxTxT = jnp.tril(jnp.ones((T, T), bool))[None] & valid_BxT[:, None, :]
  if segment_BxT is not None:
    allowed_BxTxT &= segment_BxT[:, :, None] == segment_BxT[:, None, :]
  return allowed_BxTxT


def cache_mask(cache_valid_BxS: jax.Array, valid_BxT: jax.Array, index, causal: bool = True
               ) -> tuple[jax.Array, jax.Array]:
  """(valid_BxS with the T new slots [index, index+T) written, allowed_BxTxS: slot index+t sees valid slots <= it;
  causal=False: every valid slot, for one-token steps whose caller keeps unwritten slots invalid)."""
  S = cache_valid_BxS.shape[1]
  valid_BxS = jax.lax.dynamic_update_slice(cache_valid_BxS, valid_BxT, (0, index))
  if not causal:
    return valid_BxS, jnp.broadcast_to(valid_BxS[:, None, :], (valid_BxS.shape[0], valid_BxT.shape[1], S))
  slots_T = index + jnp.arange(valid_BxT.shape[1])
  allowed_BxTxS = (jnp.arange(S)[None, :] <= slots_T[:, None])[None] & valid_BxS[:, None, :]
  return valid_BxS, allowed_BxTxS


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
  """w * x / sqrt(mean(x^2) + eps) over the last axis, in float32; the weight is the param `weight_name`."""
  config: ModelConfig
  weight_name: str = "scale"
  axis: str = "embed"  # logical axis of the weight

  @nn.compact
  def __call__(self, x):
    w = _param(self, self.weight_name, nn.initializers.ones, (self.axis,), (x.shape[-1],))
    return rms_norm(x, w, self.config.rms_norm_eps)


class Attention(nn.Module):
  """Grouped-query self-attention with rope, plus Qwen2's qkv bias and Qwen3's per-head q/k RMSNorm as configured."""
  config: ModelConfig
  init_std: float = 0.02

  def setup(self):
    c = self.config
    D, H, K, E = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    normal, zeros = nn.initializers.normal(self.init_std), nn.initializers.zeros
    self.wq = _param(self, "wq", normal, ("embed", "heads", "head_dim"), (D, H, E))
    self.wk = _param(self, "wk", normal, ("embed", "kv_heads", "head_dim"), (D, K, E))
    self.wv = _param(self, "wv", normal, ("embed", "kv_heads", "head_dim"), (D, K, E))
    self.wo = _param(self, "wo", normal, ("heads", "head_dim", "embed"), (H, E, D))
    if c.qkv_bias:
      self.bq = _param(self, "bq", zeros, ("heads", "head_dim"), (H, E))
      self.bk = _param(self, "bk", zeros, ("kv_heads", "head_dim"), (K, E))
      self.bv = _param(self, "bv", zeros, ("kv_heads", "head_dim"), (K, E))
    if c.o_bias:
      self.bo = _param(self, "bo", zeros, ("embed",), (D,))
    if c.qk_norm:
      self.norm_q = RMSNorm(c, "q_norm", "head_dim")
      self.norm_k = RMSNorm(c, "k_norm", "head_dim")
      nn.share_scope(self, self.norm_q)
      nn.share_scope(self, self.norm_k)

  def __call__(self, x_BxTxD, rope, allowed_BxTxS, cache: KVCache | None = None, index=None):
    """-> (out_BxTxD, cache). rope: `rope_tables` (cos, sin) [B, T, 1, E]. With a cache (k, v [B, K, S, E]) the
    T new k/v go in at slots [index, index+T) and queries attend over all S slots; without one, over the T tokens."""
    c = self.config
    dt = c.dtype
    q_BxTxHxE, k_BxTxKxE, v_BxTxKxE = _adapted(self, x_BxTxD, dense_fused(
        x_BxTxD, [self.wq.astype(dt), self.wk.astype(dt), self.wv.astype(dt)]), ("wq", "wk", "wv"))
    if c.qkv_bias:
      q_BxTxHxE, k_BxTxKxE, v_BxTxKxE = (q_BxTxHxE + self.bq.astype(dt), k_BxTxKxE + self.bk.astype(dt),
                                         v_BxTxKxE + self.bv.astype(dt))
    if c.qk_norm:
      q_BxTxHxE, k_BxTxKxE = self.norm_q(q_BxTxHxE), self.norm_k(k_BxTxKxE)
    q_BxTxHxE = apply_rope(q_BxTxHxE, rope)
    k_BxTxKxE = apply_rope(k_BxTxKxE, rope)
    v_BxKxTxE = v_BxTxKxE.transpose(0, 2, 1, 3)
    if cache is None:
      out_BxTxHxE = attend(q_BxTxHxE, k_BxTxKxE.transpose(0, 2, 1, 3), v_BxKxTxE, allowed_BxTxS)
    else:
      k_cache, v_cache = cache
      k_new = k_BxTxKxE.transpose(0, 2, 3, 1).astype(k_cache.dtype)
      k_BxKxExS = jax.lax.dynamic_update_slice(k_cache, k_new, (0, 0, 0, index))
      v_BxKxSxE = jax.lax.dynamic_update_slice(v_cache, v_BxKxTxE.astype(v_cache.dtype), (0, 0, index, 0))
      cache = (k_BxKxExS, v_BxKxSxE)
      out_BxTxHxE = attend_cached(q_BxTxHxE, k_BxKxExS, v_BxKxSxE, allowed_BxTxS)
    (out_BxTxD,) = _adapted(self, out_BxTxHxE, [dense(out_BxTxHxE, self.wo.astype(dt), n_in=2)], ("wo",), n_in=2)
    if c.o_bias:
      out_BxTxD = out_BxTxD + self.bo.astype(dt)
    return out_BxTxD, cache


class Mlp(nn.Module):
  """SwiGLU: w_down(silu(w_gate x) * w_up x)."""
  config: ModelConfig
  init_std: float = 0.02

  def setup(self):
    D, F = self.config.hidden_size, self.config.intermediate_size
    normal = nn.initializers.normal(self.init_std)
    self.w_gate = _param(self, "w_gate", normal, ("embed", "mlp"), (D, F))
    self.w_up = _param(self, "w_up", normal, ("embed", "mlp"), (D, F))
    self.w_down = _param(self, "w_down", normal, ("mlp", "embed"), (F, D))

  def __call__(self, x_BxTxD):
    dt = self.config.dtype
    gate_BxTxF, up_BxTxF = _adapted(self, x_BxTxD, dense_fused(x_BxTxD, [self.w_gate.astype(dt), self.w_up.astype(dt)]),
                                    ("w_gate", "w_up"))
    h_BxTxF = jax.nn.silu(gate_BxTxF) * up_BxTxF
    return _adapted(self, h_BxTxF, [dense(h_BxTxF, self.w_down.astype(dt))], ("w_down",))[0]


class Block(nn.Module):
  """Pre-norm residual block: x += attn(norm(x)); x += mlp(norm(x))."""
  config: ModelConfig
  init_std: float = 0.02

  def setup(self):
    c = self.config
    # Module attributes are norm_*, their weights *_norm: a shared scope cannot hold both under one name.
    self.norm_attn = RMSNorm(c, "attn_norm")
    self.attn = Attention(c, self.init_std)
    self.norm_mlp = RMSNorm(c, "mlp_norm")
    self.mlp = Mlp(c, self.init_std)
    for child in (self.norm_attn, self.attn, self.norm_mlp, self.mlp):
      nn.share_scope(self, child)

  def __call__(self, x_BxTxD, rope, allowed_BxTxS, cache: KVCache | None = None, index=None):
    """-> (x_BxTxD, cache); a scan body: carry x, scan over this layer's params and cache."""
    out_BxTxD, cache = self.attn(self.norm_attn(x_BxTxD), rope, allowed_BxTxS, cache, index)
    x_BxTxD = x_BxTxD + out_BxTxD
    x_BxTxD = x_BxTxD + self.mlp(self.norm_mlp(x_BxTxD))
    return x_BxTxD, cache


class Decoder(nn.Module):
  """The whole model. `__call__` gives final-normed hidden states (the train path, no cache), `decode` runs new
  tokens through a KV cache, `logits` applies the LM head.

  remat_policy: None (keep every activation) or the name of a `jax.checkpoint_policies` policy, e.g.
  "nothing_saveable", applied to each block in the layer scan.
  """
  config: ModelConfig
  remat_policy: str | None = None
  init_std: float = 0.02

  def setup(self):
    c = self.config
    normal = nn.initializers.normal(self.init_std)
    self.embed = _param(self, "embed", normal, ("vocab", "embed"), (c.vocab_size, c.hidden_size))
    block = Block
    if self.remat_policy is not None:
      if not hasattr(jax.checkpoint_policies, self.remat_policy):
        raise ValueError(f"remat_policy={self.remat_policy!r} is not a jax.checkpoint_policies name, "
                         f"e.g. 'nothing_saveable' or 'dots_with_no_batch_dims_saveable'")
      block = nn.remat(Block, policy=getattr(jax.checkpoint_policies, self.remat_policy))
    self.layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=c.num_layers,
                          metadata_params={nn.PARTITION_NAME: "layers"})(c, self.init_std)
    self.norm_final = RMSNorm(c, "final_norm")
    nn.share_scope(self, self.norm_final)
    if not c.tie_word_embeddings:
      self.lm_head = _param(self, "lm_head", normal, ("embed", "vocab"), (c.hidden_size, c.vocab_size))

  def __call__(self, tokens_BxT, valid_BxT=None, positions_BxT=None, segment_BxT=None):
    """Final-normed hidden states [B, T, D] in compute dtype; causal attention that never looks at padding
    (nor, with `segment_BxT`, across the segments of a packed row)."""
    if valid_BxT is None:
      valid_BxT = jnp.ones(tokens_BxT.shape, bool)
    if positions_BxT is None:
      positions_BxT = default_positions(valid_BxT)
    x_BxTxD, _ = self.layers(self.embed_tokens(tokens_BxT), self.rope(positions_BxT),
                             causal_mask(valid_BxT, segment_BxT), None, None)
    return self.norm_final(x_BxTxD)

  def decode(self, tokens_BxT, positions_BxT, valid_BxT, cache: dict, index):
    """T new tokens written at cache slots [index, index+T) -> (hidden_BxTxD, cache); the cache is stacked [L, ...]."""
    valid_BxS, allowed_BxTxS = cache_mask(cache["valid"], valid_BxT, index)
    x_BxTxD, (k, v) = self.layers(self.embed_rows(tokens_BxT), self.rope(positions_BxT), allowed_BxTxS,
                                  (cache["k"], cache["v"]), index)
    return self.norm_final(x_BxTxD), {"k": k, "v": v, "valid": valid_BxS}

  def rope(self, positions_BxT):
    """The (cos, sin) rope tables [B, T, 1, E] for these positions, in compute dtype."""
    return rope_tables(positions_BxT, rope_inv_freq(self.config), self.config.dtype)

  def embed_tokens(self, tokens_BxT):
    return self.embed.astype(self.config.dtype)[tokens_BxT]

  def embed_rows(self, tokens_BxT):
    """`embed_tokens` for decoding (no gradient): gather, then cast, as a cast of the whole table would be
    hoisted out of a decode loop as a [V, D] copy."""
    return self.embed[tokens_BxT].astype(self.config.dtype)

  def normalize(self, x_BxTxD):
    return self.norm_final(x_BxTxD)

  def unembed(self):
    """The LM head as w_DxV in param dtype (the transposed embedding when tied)."""
    return self.embed.T if self.config.tie_word_embeddings else self.lm_head

  def logits(self, hidden_BxTxD):
    """float32 logits [..., V] with fp32 accumulation."""
    w_DxV = self.unembed().astype(self.config.dtype)
    return jnp.einsum("...d,dv->...v", hidden_BxTxD, w_DxV, preferred_element_type=jnp.float32)
