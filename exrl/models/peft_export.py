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


def export_lora(config: ModelConfig, base: dict, adapter: dict, cfg: lora.LoraConfig, out_dir: str | os.PathLike,
                *, dtype: str | None = None) -> dict[str, str]:
  """`out_dir`/peft (the adapter) and `out_dir`/hf (base + adapter merged, `hf.save` in `dtype`).
  base: the dense or quantised base tree (a quantised one is dequantised, so the merge carries its rounding)."""
  out_dir = Path(out_dir)
  if any(k.endswith(("_int8", "_nf4")) for k in base["layers"]):
    from exrl.models import decoder  # the dense tree's shapes
    base = quant.dequantize_base(base, decoder.param_shapes(config))
  peft_dir = save_peft(config, adapter, cfg, out_dir / "peft")
  hf_dir = hf.save(config, lora.merge(base, adapter, cfg), out_dir / "hf", dtype=dtype)
  return {"peft": str(peft_dir), "hf": str(hf_dir)}
