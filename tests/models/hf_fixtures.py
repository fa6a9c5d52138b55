"""Tiny random HF models built and saved inside the tests (no hub access)."""
from __future__ import annotations

import torch
import transformers

FAMILIES = ("llama", "qwen2", "qwen3")


def make_hf_model(family: str, path, *, vocab_size: int = 97, tie: bool | None = None, seed: int = 0):
  """Build, save and return a tiny random transformers model of `family` in fp32."""
  torch.manual_seed(seed)
  common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
  if family == "llama":  # untied, llama3 rope scaling, attention bias on
    cfg = transformers.LlamaConfig(**common, tie_word_embeddings=bool(tie) if tie is not None else False,
                                   attention_bias=True, rope_theta=500000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    model = transformers.LlamaForCausalLM(cfg)
  elif family == "qwen2":  # tied, qkv bias
    cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True if tie is None else tie)
    model = transformers.Qwen2ForCausalLM(cfg)
  elif family == "qwen3":  # explicit head_dim != hidden/heads, q/k norm
    cfg = transformers.Qwen3Config(**common, head_dim=24, tie_word_embeddings=bool(tie))
    model = transformers.Qwen3ForCausalLM(cfg)
  else:
    raise ValueError(family)
  with torch.no_grad():  # random norms and biases so the parity test sees them
    for name, p in model.named_parameters():
      if "norm" in name or "bias" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(path)
  return model
