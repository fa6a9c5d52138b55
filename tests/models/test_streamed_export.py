"""hf.save_streamed (what hf.save and the LoRA export write through) against the whole-tree writers it replaced:
safetensors.save_file of every tensor at once, and hf.save of lora.merge's whole merged tree."""
import json
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from exrl.models import decoder, hf, lora, quant
from exrl.models.config import ModelConfig
from exrl.models.peft_export import export_lora

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=6, num_heads=4, num_kv_heads=2,
                  head_dim=8, model_type="qwen2", qkv_bias=True, tie_word_embeddings=True)
LORA = lora.LoraConfig(rank=4, alpha=8.0)


def _old_save_tensors(config, params, dtype):
  """The pre-streaming hf.save: every HF tensor on the host at once, numpy's own conversions."""
  to = hf._np_dtype(dtype)
  host = lambda x: np.asarray(np.asarray(x, np.float32), to)
  out = {"model.embed_tokens.weight": host(params["embed"]), "model.norm.weight": host(params["final_norm"])}
  if not config.tie_word_embeddings:
    out["lm_head.weight"] = np.ascontiguousarray(host(params["lm_head"]).T)
  for leaf, (template, kind) in hf._hf_names(config).items():
    for i in range(config.num_layers):
      out[f"model.layers.{i}.{template}"] = np.ascontiguousarray(hf._to_hf(host(params["layers"][leaf])[i], kind))
  return out


def _read_dir(path):
  out = {}
  for f in sorted(path.glob("*.safetensors")):
    with safe_open(str(f), framework="np") as st:
      out.update({k: st.get_tensor(k) for k in st.keys()})
  return out


@pytest.mark.parametrize("tie,dtype", [(True, "bfloat16"), (False, "float32")])
def test_single_file_is_save_files_bytes(tie, dtype, tmp_path):
  config = CFG if tie else CFG.__class__(**{**CFG.__dict__, "tie_word_embeddings": False})
  params = decoder.init_params(config, jax.random.key(0))
  hf.save(config, params, tmp_path / "ours", dtype=dtype)
  save_file(_old_save_tensors(config, params, dtype), str(tmp_path / "old.safetensors"), metadata={"format": "pt"})
  assert (tmp_path / "ours" / "model.safetensors").read_bytes() == (tmp_path / "old.safetensors").read_bytes()


def test_shards_and_index(tmp_path):
  params = decoder.init_params(CFG, jax.random.key(1))
  want = _old_save_tensors(CFG, params, "float32")
  layer_bytes = sum(x.nbytes for k, x in want.items() if k.startswith("model.layers.0."))
  hf.save(CFG, params, tmp_path / "s", max_shard_bytes=2 * layer_bytes)
  index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and files == sorted(p.name for p in (tmp_path / "s").glob("*.safetensors"))
  assert all(f == f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files))
  assert set(index["weight_map"]) == set(want) and index["metadata"]["total_size"] == sum(x.nbytes for x in want.values())
  for f in files:  # each shard: its tensors as save_file would write them, within the limit unless one tensor alone
    names = [k for k, v in index["weight_map"].items() if v == f]
    assert len(names) == 1 or sum(want[k].nbytes for k in names) <= 2 * layer_bytes
    save_file({k: want[k] for k in names}, str(tmp_path / "one.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "s" / f).read_bytes() == (tmp_path / "one.safetensors").read_bytes()
  _, back = hf.load(tmp_path / "s")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, params)


def _adapter(seed):
  adapter = lora.init_adapter(CFG, LORA, jax.random.key(seed))
  keys = jax.random.split(jax.random.key(seed + 1), len(adapter["layers"]))
  return {"layers": {k: v + 0.05 * jax.random.normal(kk, v.shape)  # nonzero B: the merge changes the weights
                     for (k, v), kk in zip(sorted(adapter["layers"].items()), keys)}}


@pytest.mark.parametrize("param_dtype,export_dtype", [("bfloat16", "bfloat16"), ("float32", "bfloat16"),
                                                      ("bfloat16", "float32")])
def test_streamed_merge_from_disk_equals_whole_tree_merge(param_dtype, export_dtype, tmp_path):
  hf.save(CFG, decoder.init_params(CFG, jax.random.key(2)), tmp_path / "base", dtype="bfloat16")
  config, params = hf.load(tmp_path / "base", param_dtype=param_dtype)
  adapter = _adapter(3)
  export_lora(config, tmp_path / "base", adapter, LORA, tmp_path / "new", dtype=export_dtype)
  hf.save(config, lora.merge(params, adapter, LORA), tmp_path / "old", dtype=export_dtype)
  new, old = _read_dir(tmp_path / "new" / "hf"), _read_dir(tmp_path / "old")
  assert set(new) == set(old)
  for k in old:  # fp32 products may differ in the last bit between a batched and a per-layer matmul
    np.testing.assert_allclose(new[k].astype(np.float32), old[k].astype(np.float32), rtol=1e-6, atol=1e-7,
                               err_msg=k)
  assert json.loads((tmp_path / "new" / "hf" / "config.json").read_text())["dtype"] == export_dtype
  changed = np.abs(new["model.layers.0.mlp.up_proj.weight"].astype(np.float32) -
                   _read_dir(tmp_path / "base")["model.layers.0.mlp.up_proj.weight"].astype(np.float32)).max()
  assert changed > 1e-3  # the adapter was merged


@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_streamed_merge_of_a_quantised_tree_equals_dequantise_then_merge(base_dtype, tmp_path):
  params = decoder.init_params(CFG, jax.random.key(4))
  qbase = quant.quantize_base(params, base_dtype, dense=jnp.float32)
  adapter = _adapter(5)
  export_lora(CFG, qbase, adapter, LORA, tmp_path / "new", dtype="float32")
  dense = quant.dequantize_base(qbase, decoder.param_shapes(CFG))
  hf.save(CFG, lora.merge(dense, adapter, LORA), tmp_path / "old", dtype="float32")
  new, old = _read_dir(tmp_path / "new" / "hf"), _read_dir(tmp_path / "old")
  assert set(new) == set(old)
  for k in old:
    np.testing.assert_allclose(new[k], old[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_streamed_export_holds_a_fraction_of_the_model(tmp_path):
  # numpy's buffers (tracemalloc sees them, beside Python's own objects): the whole-tree writer holds every tensor
  # at once (its transposed ones copied), the stream a few of one layer's (each 1/16 of the model here; Python's
  # objects and the rank-1 adapter come on top).
  config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=512, num_layers=6, num_heads=4,
                       num_kv_heads=2, head_dim=16, model_type="qwen2", qkv_bias=True, tie_word_embeddings=True)
  cfg = lora.LoraConfig(rank=1)
  hf.save(config, decoder.init_params(config, jax.random.key(6)), tmp_path / "base", dtype="float32")
  _, params = hf.load(tmp_path / "base")
  adapter = lora.init_adapter(config, cfg, jax.random.key(7))
  model_bytes = sum(x.nbytes for x in _read_dir(tmp_path / "base").values())

  def numpy_peak(fn):
    fn()  # warm: jax's compile caches are Python allocations too
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak

  new = numpy_peak(lambda: export_lora(config, tmp_path / "base", adapter, cfg, tmp_path / "new"))
  old = numpy_peak(lambda: save_file(_old_save_tensors(config, lora.merge(params, adapter, cfg), "float32"),
                                     str(tmp_path / "old.safetensors")))
  assert old >= 0.9 * model_bytes and new <= model_bytes / 4, (new, old, model_bytes)
