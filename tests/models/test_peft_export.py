"""The LoRA export against the oracle: HF peft on transformers loads the adapter dir, and transformers the merged
dir, and both give exrl's adapted logits within 1e-4."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from exrl.models import decoder, hf, lora
from exrl.models.peft_export import export_lora
from tests.models.hf_fixtures import make_hf_model
from tests.models.test_hf_parity import _hf_logits, _ragged_batch

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("family,targets", [("qwen2", lora.ALL_TARGETS), ("llama", "q_proj|v_proj|down_proj")])
def test_peft_and_merged_exports_match_exrl(family, targets, tmp_path):
  make_hf_model(family, tmp_path / "base")
  config, params = hf.load(tmp_path / "base")
  cfg = lora.LoraConfig(rank=4, alpha=16.0, targets=targets, base_path=str(tmp_path / "base"))
  adapter = lora.init_adapter(config, cfg, jax.random.key(0))
  keys = jax.random.split(jax.random.key(1), len(adapter["layers"]))
  adapter = {"layers": {k: v + 0.05 * jax.random.normal(kk, v.shape)  # nonzero B, so the adapter matters
                        for (k, v), kk in zip(sorted(adapter["layers"].items()), keys)}}
  base = tmp_path / "base" if family == "qwen2" else params  # from disk, as experiments.grpo passes it, or a tree
  out = export_lora(config, base, adapter, cfg, tmp_path / "export")
  saved = json.loads((tmp_path / "export" / "peft" / "adapter_config.json").read_text())
  assert saved["r"] == 4 and saved["lora_alpha"] == 16.0 and saved["base_model_name_or_path"] == str(tmp_path / "base")

  tokens, valid = _ragged_batch(config.vocab_size, "left", seed=2)
  ours = np.asarray(decoder.logits(config, lora.combine(params, adapter, cfg), jnp.asarray(tokens), jnp.asarray(valid)))
  base_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
  base_logits = _hf_logits(base_model, tokens, valid)
  peft_model = peft.PeftModel.from_pretrained(base_model, out["peft"]).eval()
  theirs = _hf_logits(peft_model, tokens, valid)
  assert np.abs(theirs - base_logits)[valid].max() > 1e-2  # peft did load and apply the adapter
  assert np.abs(ours - theirs)[valid].max() <= 1e-4
  merged = transformers.AutoModelForCausalLM.from_pretrained(out["hf"]).eval()
  assert np.abs(ours - _hf_logits(merged, tokens, valid))[valid].max() <= 1e-4
  with torch.no_grad():  # peft's own merge agrees with ours
    peft_merged = peft_model.merge_and_unload()
  assert np.abs(ours - _hf_logits(peft_merged, tokens, valid))[valid].max() <= 1e-4
