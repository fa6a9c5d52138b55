"""Export a LoRA run: a PEFT adapter directory and a merged HF directory.

PEFT's layout (what `peft.PeftModel.from_pretrained` and vLLM's LoRA loader read):
  adapter_config.json          peft_type LORA, r, lora_alpha, target_modules (HF module names), ...
  adapter_model.safetensors    base_model.model.model.layers.{i}.{self_attn|mlp}.{q_proj|...}.lora_A.weight [r, in]
                               and ...lora_B.weight [out, r], float32; PEFT scales B A by lora_alpha / r.
exrl's A [*in, r] and B [r, *out] are the transposes with the head axes flattened as HF flattens them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from exrl.models import hf, lora, quant
from exrl.models.config import ModelConfig


def peft_tensors(config: ModelConfig, adapter: dict, cfg: lora.LoraConfig) -> dict[str, np.ndarray]:
  """PEFT key -> float32 array for every layer and target."""
  tensors = {}
  for name in lora.target_names(cfg):
    a = np.asarray(adapter["layers"][f"{name}_lora_a"], np.float32)
    b = np.asarray(adapter["layers"][f"{name}_lora_b"], np.float32)
    for i in range(config.num_layers):
      prefix = f"base_model.model.model.layers.{i}.{lora.HF_MODULES[name]}"
      tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, cfg.rank).T)
      tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(cfg.rank, -1).T)
  return tensors


def save_peft(config: ModelConfig, adapter: dict, cfg: lora.LoraConfig, path: str | os.PathLike) -> Path:
  """Write `path`/adapter_config.json + adapter_model.safetensors."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  save_file(peft_tensors(config, adapter, cfg), str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
  adapter_config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": cfg.base_path or None,
      "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
      "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
      "target_modules": sorted(lora.HF_MODULES[n].split(".")[-1] for n in lora.target_names(cfg)),
  }
  (path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
  return path


def export_lora(config: ModelConfig, base: dict | str | os.PathLike, adapter: dict, cfg: lora.LoraConfig,
                out_dir: str | os.PathLike, *, dtype: str | None = None) -> dict[str, str]:
  """`out_dir`/peft (the adapter) and `out_dir`/hf (base + adapter merged, in `dtype`), equal to
  `hf.save(config, lora.merge(base, adapter, cfg), ...)` but made and written one tensor at a time
  (`hf.save_streamed`): the export holds about one tensor (the embedding the largest) beyond its inputs.
  base: the base model's HF directory (read tensor by tensor in config.param_dtype, as `hf.load` reads it), or its
  param tree, dense or quantised (dequantised a layer at a time, so the merge carries its rounding)."""
  out_dir = Path(out_dir)
  peft_dir = save_peft(config, adapter, cfg, out_dir / "peft")
  targets = set(lora.target_names(cfg))
  if isinstance(base, dict):
    top, base_layer, close = (lambda name: base[name]), _tree_layer(config, base), (lambda: None)
  else:
    reader = hf.Reader(base, config)
    top, base_layer, close = reader.top, reader.layer, reader.close

  def read(fn, *args):  # unmap the checkpoint after each tensor: its pages would otherwise stay in RSS
    x = fn(*args)
    close()
    return x

  def layer(leaf: str, i: int):
    w = read(base_layer, leaf, i)
    return _merge_layer(w, adapter, cfg, leaf, i) if leaf in targets else w

  hf_dir = hf.save_streamed(config, lambda name: read(top, name), layer, out_dir / "hf", dtype=dtype)
  return {"peft": str(peft_dir), "hf": str(hf_dir)}


def _tree_layer(config: ModelConfig, base: dict):
  """(leaf, i) -> layer i of `base`'s leaf, dequantised to float32 if the base holds it quantised."""
  from exrl.models import decoder  # the dense tree's shapes
  shapes, layers = decoder.param_shapes(config)["layers"], base["layers"]

  def layer(leaf: str, i: int):
    if leaf in layers:
      return layers[leaf][i]
    if f"{leaf}_int8" in layers:
      return quant.int8_dequantize(layers[f"{leaf}_int8"][i], layers[f"{leaf}_int8_scale"][i], jnp.float32)
    return quant.nf4_dequantize(layers[f"{leaf}_nf4"][i], layers[f"{leaf}_nf4_absmax"][i], shapes[leaf][1:],
                                jnp.float32)
  return layer


def _merge_layer(w, adapter: dict, cfg: lora.LoraConfig, name: str, i: int) -> np.ndarray:
  """Layer i of `lora.merge`: w + (alpha / r) A_i @ B_i in fp32, rounded to w's dtype."""
  a, b = adapter["layers"][f"{name}_lora_a"][i], adapter["layers"][f"{name}_lora_b"][i]
  r = a.shape[-1]
  ab = jnp.asarray(a, jnp.float32).reshape(-1, r) @ jnp.asarray(b, jnp.float32).reshape(r, -1)
  w = np.asarray(w)
  merged = w.astype(np.float32)  # a copy, added to in place: one fp32 layer-sized temp beside the delta
  merged += np.asarray(cfg.scale * ab).reshape(w.shape)
  return merged.astype(w.dtype, copy=False)
