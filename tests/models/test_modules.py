"""The Flax modules: the param tree keeps exrl's layout, logical axes come from the modules, remat and the cache
paths agree with the plain forward, a wrapping module works, and bad HF config.json files fail in one line."""
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exrl.models import decoder, hf
from exrl.models.config import ModelConfig
from exrl.models.modules import Decoder
from exrl.infra import mesh as mesh_lib

L, D, H, K, E, F, V = 2, 32, 4, 2, 8, 48, 64
CONFIGS = {
    "qwen2": ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=H, num_kv_heads=K,
                         head_dim=E, model_type="qwen2", qkv_bias=True),
    "qwen3": ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=H, num_kv_heads=K,
                         head_dim=E, model_type="qwen3", qk_norm=True, tie_word_embeddings=False),
    "llama": ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=H, num_kv_heads=K,
                         head_dim=E, model_type="llama", qkv_bias=True, o_bias=True, tie_word_embeddings=False,
                         rope_type="llama3", rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0),
                                                           ("low_freq_factor", 1.0),
                                                           ("original_max_position_embeddings", 16.0))),
}

# The layout exrl checkpoints were written in before the Flax port (the oracle): name -> (shape, logical axes).
LEGACY = {
    "embed": ((V, D), ("vocab", "embed")), "final_norm": ((D,), ("embed",)),
    "layers/attn_norm": ((L, D), ("layers", "embed")), "layers/mlp_norm": ((L, D), ("layers", "embed")),
    "layers/wq": ((L, D, H, E), ("layers", "embed", "heads", "head_dim")),
    "layers/wk": ((L, D, K, E), ("layers", "embed", "kv_heads", "head_dim")),
    "layers/wv": ((L, D, K, E), ("layers", "embed", "kv_heads", "head_dim")),
    "layers/wo": ((L, H, E, D), ("layers", "heads", "head_dim", "embed")),
    "layers/w_gate": ((L, D, F), ("layers", "embed", "mlp")), "layers/w_up": ((L, D, F), ("layers", "embed", "mlp")),
    "layers/w_down": ((L, F, D), ("layers", "mlp", "embed")),
}
OPTIONAL = {
    "qkv_bias": {"layers/bq": ((L, H, E), ("layers", "heads", "head_dim")),
                 "layers/bk": ((L, K, E), ("layers", "kv_heads", "head_dim")),
                 "layers/bv": ((L, K, E), ("layers", "kv_heads", "head_dim"))},
    "o_bias": {"layers/bo": ((L, D), ("layers", "embed"))},
    "qk_norm": {"layers/q_norm": ((L, E), ("layers", "head_dim")), "layers/k_norm": ((L, E), ("layers", "head_dim"))},
}


def _legacy(config):
  table = dict(LEGACY)
  for flag, extra in OPTIONAL.items():
    if getattr(config, flag):
      table.update(extra)
  if not config.tie_word_embeddings:
    table["lm_head"] = ((D, V), ("embed", "vocab"))
  return table


def _flat(tree, is_leaf=None):
  return {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf)[0]}


def _batch(seed=0, B=3, T=10):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  valid = jnp.asarray(np.arange(T)[None] >= np.array([[0], [3], [6]])[:B])  # left padded, ragged
  return tokens, valid


@pytest.mark.parametrize("family", CONFIGS)
def test_tree_is_the_legacy_layout_with_axes_from_the_modules(family):
  config = CONFIGS[family]
  want = _legacy(config)
  params = jax.eval_shape(lambda k: decoder.init_params(config, k), jax.random.key(0))
  assert all(type(d) is dict for d in (params, params["layers"])), "params must stay a plain nested dict"
  assert {k: tuple(v.shape) for k, v in _flat(params).items()} == {k: s for k, (s, _) in want.items()}
  assert _flat(decoder.param_axes(config), lambda x: isinstance(x, tuple)) == {k: a for k, (_, a) in want.items()}
  # Flax-native init: boxed leaves carrying the same names, unboxing to the same tree.
  boxed = jax.jit(Decoder(config).init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
  names = _flat(jax.tree.map(lambda b: b.names, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)),
                lambda x: isinstance(x, tuple))
  assert names == {k: a for k, (_, a) in want.items()}
  unboxed = nn.unbox(boxed)
  chex.assert_trees_all_equal_shapes_and_dtypes(unboxed, params)
  for name, x in _flat(jax.device_get(unboxed)).items():  # the initialisers: unit norms, zero biases, normal(0.02)
    leaf = name.split("/")[-1]
    if "norm" in leaf:
      np.testing.assert_array_equal(x, 1.0)
    elif leaf.startswith("b"):
      np.testing.assert_array_equal(x, 0.0)
    else:
      assert 0.015 < float(np.std(x)) < 0.025, (name, float(np.std(x)))


def test_init_params_keeps_the_historical_values():
  """Same seed, same model as before the port: one key split per leaf in sorted-path order."""
  config = CONFIGS["qwen3"]
  params = decoder.init_params(config, jax.random.key(7), std=0.05)
  names = sorted(_legacy(config))
  keys = jax.random.split(jax.random.key(7), len(names))
  for name, k in zip(names, keys):
    got = _flat(params)[name]
    if "norm" in name:
      np.testing.assert_array_equal(got, 1.0)
    elif name.split("/")[-1].startswith("b"):
      np.testing.assert_array_equal(got, 0.0)
    else:
      np.testing.assert_array_equal(got, 0.05 * jax.random.normal(k, got.shape))


def test_sharding_comes_from_module_metadata():
  config = CONFIGS["qwen2"]
  params = decoder.init_params(config, jax.random.key(0))
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=2, tensor=4), jax.devices()[:8])
  specs = _flat(jax.tree.map(lambda s: s.spec, mesh_lib.param_shardings(params, decoder.param_axes(config), mesh)))
  P = jax.sharding.PartitionSpec
  assert specs["layers/wq"] == P(None, "fsdp", "tensor", None)
  assert specs["layers/wk"] == P(None, "fsdp", None, None)  # K=2 kv heads do not split over tensor=4
  assert specs["layers/w_down"] == P(None, "tensor", "fsdp")
  assert specs["embed"] == P("tensor", "fsdp")


def test_remat_gives_the_same_values_and_grads():
  config = CONFIGS["llama"]
  params = decoder.init_params(config, jax.random.key(0), std=0.2)
  tokens, valid = _batch()
  # A random readout: sum(h**2) of RMS-normed h is nearly constant and would give near-zero gradients.
  w_D = jax.random.normal(jax.random.key(1), (D,))
  loss = lambda p, r: jnp.sum(jnp.where(valid, jnp.tanh(decoder.hidden_states(config, p, tokens, valid, remat=r) @ w_D),
                                        0.0))
  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  want_l, want_g = grad(params, False)
  for remat in (True, "dots_with_no_batch_dims_saveable"):
    got_l, got_g = grad(params, remat)
    np.testing.assert_allclose(got_l, want_l, rtol=1e-5)
    chex.assert_trees_all_close(got_g, want_g, rtol=1e-5, atol=5e-5)  # grads are O(1); recompute order differs
  with pytest.raises(ValueError, match="remat_policy='everything'.*checkpoint_policies"):
    decoder.hidden_states(config, params, tokens, valid, remat="everything")


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_cached_decode_matches_the_plain_forward(family, per_layer):
  """Prefill 7 slots, then 3 single-token steps through the cache == one no-cache pass over all 10."""
  config = CONFIGS[family]
  params = decoder.init_params(config, jax.random.key(0), std=0.2)
  tokens, valid = _batch()
  want = decoder.hidden_states(config, params, tokens, valid)
  positions = decoder.default_positions(valid)
  p = decoder.unstack_layers(params) if per_layer else params
  cache = decoder.init_cache(config, 3, 10, per_layer=per_layer)
  step = jax.jit(decoder.decode_step, static_argnums=0)
  h, cache = step(config, p, tokens[:, :7], positions[:, :7], valid[:, :7], cache, 0)
  got = [h]
  for t in range(7, 10):
    h, cache = step(config, p, tokens[:, t:t + 1], positions[:, t:t + 1], valid[:, t:t + 1], cache, t)
    got.append(h)
  got = jnp.concatenate(got, axis=1)
  np.testing.assert_allclose(np.asarray(got)[np.asarray(valid)], np.asarray(want)[np.asarray(valid)], atol=2e-5)


class ValueModel(nn.Module):
  """What a user builds on the decoder: a scalar value head over its hidden states."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, valid_BxT):
    h_BxTxD = Decoder(self.config, name="decoder")(tokens_BxT, valid_BxT)
    return nn.Dense(1, name="value")(h_BxTxD)[..., 0]


def test_decoder_wraps_as_a_submodule():
  config = CONFIGS["qwen2"]
  tokens, valid = _batch()
  variables = nn.unbox(jax.jit(ValueModel(config).init)(jax.random.key(0), tokens, valid))
  assert set(variables["params"]) == {"decoder", "value"}
  chex.assert_trees_all_equal_shapes(variables["params"]["decoder"], decoder.init_params(config, jax.random.key(0)))
  got = jax.jit(ValueModel(config).apply)(variables, tokens, valid)
  head = variables["params"]["value"]
  h = jax.jit(decoder.hidden_states, static_argnums=0)(config, variables["params"]["decoder"], tokens, valid)
  chex.assert_trees_all_close(got, h @ head["kernel"][:, 0] + head["bias"][0], atol=1e-6)


# ----------------------------------------------------------------------------- HF config.json errors


def _write_config(tmp_path, text):
  (tmp_path / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
  return tmp_path / "config.json"


def _good():
  return hf.config_to_hf(CONFIGS["qwen2"])


@pytest.mark.parametrize("case,pattern", [
    ("not_json", r"config\.json is not valid JSON: Expecting .* line 1 column"),
    ("list", r"config\.json holds a JSON list; expected an object"),
    ("bad_utf8", r"config\.json is not UTF-8"),
    ("no_hidden_size", r"config\.json lacks the field 'hidden_size'"),
    ("string_size", r"config\.json: field 'num_hidden_layers' is '2'; expected a positive integer"),
    ("rope_field", r"config\.json: rope_type='llama3' needs rope scaling fields .* missing \['low_freq_factor'\]"),
    ("heads", r"config\.json: num_heads=4 must be a multiple of num_kv_heads=3"),
])
def test_bad_config_json_is_one_line_naming_file_and_field(tmp_path, case, pattern):
  cfg = _good()
  if case == "not_json":
    text = '{"model_type": "qwen2",'
  elif case == "list":
    text = "[1, 2]"
  elif case == "bad_utf8":
    text = b'{"model_type": "\xff"}'
  else:
    if case == "no_hidden_size":
      del cfg["hidden_size"]
    elif case == "string_size":
      cfg["num_hidden_layers"] = "2"
    elif case == "rope_field":
      cfg["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 16}
    elif case == "heads":
      cfg["num_key_value_heads"] = 3
    text = json.dumps(cfg)
  _write_config(tmp_path, text)
  with pytest.raises(ValueError, match=pattern) as e:
    hf.load(tmp_path)
  assert isinstance(e.value, hf.CheckpointError)
  assert "\n" not in str(e.value) and str(tmp_path / "config.json") in str(e.value)
