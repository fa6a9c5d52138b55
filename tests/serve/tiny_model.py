"""A tiny random exrl model saved as an HF directory with a SentencePiece tokenizer (built in the tests, no hub)."""
from __future__ import annotations

import shutil
from pathlib import Path

import jax

from exrl.models import decoder, hf
from exrl.models.config import ModelConfig
from exrl.tokenizer import train_sentencepiece

CORPUS = ["12+34=46", "7+8=15", "lessons learned from attempts", "the better attempts checked the answer",
          "Problem: add the numbers.", "score 1 correct", "score 0 wrong", '{"lessons": ["check the carry"]}',
          '[{"op": "add", "text": "x"}]', "user: assistant: system:"] * 4


def make_tiny_model_dir(path: Path, seed: int = 0) -> Path:
  """Write config.json, model.safetensors and tokenizer.model into `path`; returns it."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tok = train_sentencepiece(CORPUS, 96, path / "sp" / "tokenizer", byte_fallback=False, seed=seed)
  shutil.copy(path / "sp" / "tokenizer.model", path / "tokenizer.model")
  shutil.rmtree(path / "sp")
  config = ModelConfig(vocab_size=8 * -(-tok.vocab_size // 8), hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=4, num_kv_heads=2, head_dim=8, model_type="qwen2", qkv_bias=True,
                       max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tok.bos_id,
                       eos_token_ids=(tok.eos_id,), pad_token_id=tok.pad_id)
  hf.save(config, decoder.init_params(config, jax.random.key(seed)), path)
  return path
