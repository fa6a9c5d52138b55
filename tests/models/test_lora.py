"""LoRA adapters and the quantised base: exact identity at init, gradients against finite differences, merge
against the on-the-fly path, the sampler's decode path, and the documented int8 / nf4 round-trip bounds."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exrl.models import decoder, lora, quant
from exrl.models.config import ModelConfig
from exrl.rollout.sampler import SamplingConfig, generate, sample

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, qkv_bias=True)
LORA = lora.LoraConfig(rank=4, alpha=8.0)
_logits = jax.jit(lambda params, tokens: decoder.logits(CONFIG, params, tokens))  # one compile per tree structure


def _setup(seed=0):
  params = decoder.init_params(CONFIG, jax.random.key(seed))
  adapter = lora.init_adapter(CONFIG, LORA, jax.random.key(seed + 1))
  tokens = jax.random.randint(jax.random.key(seed + 2), (2, 7), 0, CONFIG.vocab_size)
  return params, adapter, tokens


def _perturbed(adapter, seed=3, scale=0.1):
  leaves, treedef = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_zero_b_gives_the_base_exactly():
  params, adapter, tokens = _setup()
  assert all(not np.any(v) for k, v in adapter["layers"].items() if k.endswith("_lora_b"))
  base = _logits(params, tokens)
  adapted = _logits(lora.combine(params, adapter, LORA), tokens)
  np.testing.assert_array_equal(np.asarray(base), np.asarray(adapted))


def test_targets_regex_selects_projections():
  assert lora.target_names(lora.LoraConfig(rank=2, targets="q_proj|v_proj")) == ("wq", "wv")
  assert lora.target_names(lora.LoraConfig(rank=2, targets=".*_proj")) == tuple(lora.HF_MODULES)
  assert lora.target_names(lora.LoraConfig(rank=2, targets="w_down")) == ("w_down",)
  with pytest.raises(ValueError, match="matches no projection"):
    lora.LoraConfig(rank=2, targets="attn")
  with pytest.raises(ValueError, match="base_dtype"):
    lora.LoraConfig(rank=2, base_dtype="int4")


def test_merge_matches_on_the_fly():
  params, adapter, tokens = _setup()
  adapter = _perturbed(adapter)
  on_the_fly = _logits(lora.combine(params, adapter, LORA), tokens)
  merged = _logits(lora.merge(params, adapter, LORA), tokens)
  base = _logits(params, tokens)
  assert float(jnp.max(jnp.abs(on_the_fly - base))) > 0.1  # the adapter does change the model
  chex.assert_trees_all_close(on_the_fly, merged, atol=2e-5)


def test_adapter_gradient_matches_finite_differences():
  params, adapter, tokens = _setup()
  adapter = _perturbed(adapter, scale=0.05)
  probe = jax.random.normal(jax.random.key(7), (2, 7, CONFIG.vocab_size))
  loss = jax.jit(lambda ad: jnp.sum(_logits(lora.combine(params, ad, LORA), tokens) * probe) / 100)
  grads = jax.grad(loss)(adapter)
  assert set(grads["layers"]) == set(adapter["layers"])  # gradients for the adapter only
  for i in range(3):  # directional derivatives along random directions, one leaf-tree at a time
    direction = _perturbed(jax.tree.map(jnp.zeros_like, adapter), seed=10 + i, scale=1.0)
    norm = float(jnp.sqrt(sum(jnp.sum(d * d) for d in jax.tree.leaves(direction))))
    direction = jax.tree.map(lambda d: d / norm, direction)  # a unit step, so eps is the step's length
    eps = 1e-2
    step = lambda s: jax.tree.map(lambda a, d: a + s * eps * d, adapter, direction)
    fd = (float(loss(step(1.0))) - float(loss(step(-1.0)))) / (2 * eps)
    analytic = sum(float(jnp.sum(g * d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, fd, rtol=2e-3, atol=1e-4)


def test_sampler_decodes_with_the_adapter():
  """The one-token decode path (fused q/k/v matmul) applies the adapter: greedy tokens equal the merged model's."""
  params, adapter, _ = _setup()
  adapter = _perturbed(adapter, scale=0.3)
  prompts = jnp.array([[5, 6, 7, 8], [9, 10, 11, 12]], jnp.int32)
  valid = jnp.ones(prompts.shape, bool)
  sampling = SamplingConfig(max_new_tokens=6, greedy=True)
  run = lambda p: np.asarray(sample(CONFIG, p, prompts, valid, jax.random.key(0), sampling).tokens_BxN)
  on_the_fly, merged, base = run(lora.combine(params, adapter, LORA)), run(lora.merge(params, adapter, LORA)), run(params)
  np.testing.assert_array_equal(on_the_fly, merged)
  assert (on_the_fly != base).any()


@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_quantised_base_runs_like_its_dequantised_weights(base_dtype):
  params, adapter, tokens = _setup()
  adapter = _perturbed(adapter)
  q = quant.quantize_base(params, base_dtype)
  assert not any(k in q["layers"] for k in quant.PROJECTIONS)
  if base_dtype == "int8":  # quantised layer by layer, as the numpy formula over each whole stack
    for name in quant.PROJECTIONS:
      w = np.asarray(params["layers"][name], np.float32)
      scale = np.abs(w).max(axis=tuple(range(1, 1 + quant.N_IN.get(name, 1))), keepdims=True) / 127
      np.testing.assert_array_equal(np.asarray(q["layers"][f"{name}_int8"]), np.clip(np.round(w / scale), -127, 127))
  dq = quant.dequantize_base(q, decoder.param_shapes(CONFIG))
  chex.assert_trees_all_close(_logits(lora.combine(q, adapter, LORA), tokens),
                              _logits(lora.combine(dq, adapter, LORA), tokens), atol=1e-5)


def test_nf4_round_trip_within_documented_bound():
  w = jax.random.normal(jax.random.key(0), (3, 40, 24)) * jnp.linspace(0.01, 2.0, 24)  # n = 960: 15 blocks
  packed, absmax = quant.nf4_quantize(w)
  back = np.asarray(quant.nf4_dequantize(packed, absmax, w.shape[1:], jnp.float32))
  w_np = np.asarray(w).reshape(3, -1, quant.NF4_BLOCK)
  amax = np.abs(w_np).max(-1, keepdims=True)
  err = np.abs(back.reshape(w_np.shape) - w_np)
  assert np.all(err <= quant.NF4_MAX_HALF_GAP * amax + 1e-6)
  # numpy oracle: nearest level of w / absmax
  codes = np.argmin(np.abs((w_np / amax)[..., None] - quant.NF4_LEVELS), axis=-1)
  np.testing.assert_allclose(back.reshape(w_np.shape), quant.NF4_LEVELS[codes] * amax, rtol=1e-6, atol=1e-7)
  assert 0.3 < err.max() / (quant.NF4_MAX_HALF_GAP * amax).max() <= 1.0  # the bound is not vacuous


def test_int8_round_trip_within_documented_bound():
  w = jax.random.normal(jax.random.key(1), (2, 4, 8, 16))
  q, scale = quant.int8_quantize(w, n_in=2)
  chex.assert_shape(scale, (2, 1, 1, 16))
  err = np.abs(np.asarray(quant.int8_dequantize(q, scale, jnp.float32)) - np.asarray(w))
  assert np.all(err <= np.asarray(scale) / 2 + 1e-7)


@pytest.mark.parametrize("base_dtype", ["float32", "int8"])
def test_sampler_holds_no_copy_of_the_layer_weights(base_dtype):
  """XLA's own buffer accounting of the compiled sampler: its temporaries stay well under the layer weights (an
  unstacked, hoisted-cast or dequantised copy of every layer would be >= their fp32 size)."""
  config = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=1024, num_layers=8, num_heads=4,
                       num_kv_heads=2, head_dim=32, tie_word_embeddings=True)
  shapes = decoder.param_shapes(config)
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes, is_leaf=lambda x: isinstance(x, tuple))
  base = jax.eval_shape(lambda p: quant.quantize_base(p, base_dtype), params)
  layer_bytes = 4 * lora.count(params["layers"])
  tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  compiled = jax.jit(generate, static_argnums=(0, 1)).lower(
      config, SamplingConfig(max_new_tokens=4, layer_loop="scan"), base, tokens, jax.ShapeDtypeStruct((2, 8), bool),
      jax.random.key(0)).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 0.35 * layer_bytes, (temp, layer_bytes)  # one layer at a time: ~1/8 of them, plus small buffers


def test_quantised_base_on_cpu_reads_its_head_without_an_fp32_copy():
  """XLA:CPU casts a bf16 matrix that a dot reads to fp32 whole: the int8 / nf4 base holds the embedding (the tied
  head) in fp32 there, so the compiled sampler's temp stays well under one fp32 embedding (a bf16 head: >= 1x)."""
  assert jax.default_backend() == "cpu" and quant.dense_dtype() == jnp.float32
  config = ModelConfig(vocab_size=16384, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                       num_kv_heads=1, head_dim=32, tie_word_embeddings=True)
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.bfloat16), decoder.param_shapes(config),
                        is_leaf=lambda x: isinstance(x, tuple))
  base = jax.eval_shape(lambda p: quant.quantize_base(p, "int8"), params)
  assert base["embed"].dtype == jnp.float32
  compiled = jax.jit(generate, static_argnums=(0, 1)).lower(
      config, SamplingConfig(max_new_tokens=2, layer_loop="scan"), base, jax.ShapeDtypeStruct((2, 4), jnp.int32),
      jax.ShapeDtypeStruct((2, 4), bool), jax.random.key(0)).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 0.5 * 4 * config.vocab_size * config.hidden_size
