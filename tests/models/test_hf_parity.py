"""Parity against transformers (the oracle) for Llama, Qwen2 and Qwen3 on ragged padded batches."""
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from exrl.models import decoder, hf
from tests.models.hf_fixtures import FAMILIES, make_hf_model


def _ragged_batch(vocab, pad_side, seed=0):
  rng = np.random.default_rng(seed)
  lengths = [12, 7, 3, 10]
  T = max(lengths)
  tokens = np.zeros((len(lengths), T), np.int64)
  valid = np.zeros((len(lengths), T), bool)
  for i, n in enumerate(lengths):
    sl = slice(T - n, T) if pad_side == "left" else slice(0, n)
    tokens[i, sl] = rng.integers(3, vocab, n)
    valid[i, sl] = True
  return tokens, valid


def _hf_logits(model, tokens, valid):
  positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(valid.astype(np.int64)),
                position_ids=torch.tensor(positions))
  return out.logits.float().numpy()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_logits_match_transformers(family, pad_side, tmp_path):
  model = make_hf_model(family, tmp_path)
  config, params = hf.load(tmp_path)
  tokens, valid = _ragged_batch(config.vocab_size, pad_side)
  ours = np.asarray(decoder.logits(config, params, jnp.asarray(tokens), jnp.asarray(valid)))
  chex.assert_shape(ours, (*tokens.shape, config.vocab_size))
  theirs = _hf_logits(model, tokens, valid)
  assert np.abs(ours - theirs)[valid].max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_transformers_load(family, tmp_path):
  model = make_hf_model(family, tmp_path / "orig", tie=(family != "qwen2"))
  config, params = hf.load(tmp_path / "orig")
  # Sharded save exercises the index path too.
  hf.save(config, params, tmp_path / "saved", max_shard_bytes=20_000)
  assert (tmp_path / "saved" / "model.safetensors.index.json").exists()
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
  tokens, valid = _ragged_batch(config.vocab_size, "left", seed=1)
  chex.assert_trees_all_close(_hf_logits(reloaded, tokens, valid)[valid], _hf_logits(model, tokens, valid)[valid],
                              atol=1e-5)
  config2, params2 = hf.load(tmp_path / "saved")
  assert config2 == config
  chex.assert_trees_all_equal(params2, params)


def test_bf16_params_roundtrip(tmp_path):
  make_hf_model("qwen2", tmp_path / "orig")
  config, params = hf.load(tmp_path / "orig", param_dtype="bfloat16", compute_dtype="bfloat16")
  assert params["embed"].dtype == jnp.bfloat16
  hf.save(config, params, tmp_path / "bf16")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
  assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
  _, params2 = hf.load(tmp_path / "bf16", param_dtype="bfloat16")
  chex.assert_trees_all_equal(params2, params)


def test_fp32_training_exports_in_the_input_dtype(tmp_path):
  # A bf16 checkpoint trained in fp32 goes back out as bf16: half the bytes, the input's dtype in config.json.
  make_hf_model("qwen2", tmp_path / "orig")
  config, params = hf.load(tmp_path / "orig")  # fp32 params
  hf.save(config, params, tmp_path / "fp32")
  in_dtype = hf.saved_dtype({"torch_dtype": "bfloat16"})
  hf.save(config, params, tmp_path / "bf16", dtype=in_dtype)
  cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
  assert in_dtype == cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
  size = lambda d: (tmp_path / d / "model.safetensors").stat().st_size
  assert abs(size("bf16") / size("fp32") - 0.5) < 0.01
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
  assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
  _, params2 = hf.load(tmp_path / "bf16", param_dtype="bfloat16")
  chex.assert_trees_all_equal(params2, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
  assert hf.saved_dtype({"torch_dtype": "torch.float16"}) == "float16"
  assert hf.saved_dtype({}) == hf.saved_dtype({"dtype": "int8"}) == "float32"
  with pytest.raises(ValueError, match="dtype='fp8'"):
    hf.save(config, params, tmp_path / "bad", dtype="fp8")


# ----------------------------------------------------------------------------- bad input


def test_unknown_model_type(tmp_path):
  make_hf_model("qwen2", tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["model_type"] = "gpt_neox"
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf.CheckpointError, match=r"gpt_neox.*supported.*llama.*qwen2.*qwen3"):
    hf.load(tmp_path)


def test_no_weights(tmp_path):
  make_hf_model("qwen2", tmp_path)
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(hf.CheckpointError, match="no \\*.safetensors"):
    hf.load(tmp_path)


def test_truncated_safetensors(tmp_path):
  make_hf_model("qwen2", tmp_path)
  f = tmp_path / "model.safetensors"
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(hf.CheckpointError, match="model.safetensors"):
    hf.load(tmp_path)


def test_missing_and_misshaped_tensor(tmp_path):
  from safetensors.numpy import load_file, save_file
  make_hf_model("qwen2", tmp_path)
  f = tmp_path / "model.safetensors"
  tensors = load_file(f)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, f)
  with pytest.raises(hf.CheckpointError, match=r"model.layers.1.mlp.up_proj.weight.*missing"):
    hf.load(tmp_path)
  tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((96, 32), np.float32)
  save_file(tensors, f)
  with pytest.raises(hf.CheckpointError, match=r"up_proj.*\[96, 32\].*expected \[96, 64\]"):
    hf.load(tmp_path)
