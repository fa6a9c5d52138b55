"""Shared set-up for the built-in-task experiments: tokenizer, tiny model, SFT data, result tables."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import jax

from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.tasks import tokenizer_corpus
from exrl.tokenizer import SentencePieceTokenizer, load_tokenizer, train_sentencepiece


@dataclasses.dataclass(frozen=True)
class TinyModel:
  """A few-M-parameter Qwen2-style decoder sized for CPU experiments."""
  hidden_size: int = 192
  num_layers: int = 4
  num_heads: int = 6
  num_kv_heads: int = 2
  head_dim: int = 32
  intermediate_size: int = 512

  def config(self, vocab_size: int, tokenizer) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                       num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                       head_dim=self.head_dim, model_type="qwen2", qkv_bias=True, max_position_embeddings=512,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_id,
                       eos_token_ids=(tokenizer.eos_id,), pad_token_id=tokenizer.pad_id)


def build_tokenizer(tasks: Sequence, out_dir: Path, seed: int = 0, vocab_size: int = 64) -> SentencePieceTokenizer:
  """Train (or reload) a small SentencePiece model on the tasks' prompts and SFT targets."""
  out_dir.mkdir(parents=True, exist_ok=True)
  model_file = out_dir / "tokenizer.model"
  if model_file.exists():
    return load_tokenizer(model_file)
  corpus = tokenizer_corpus(tasks, n_per_task=1000, seed=seed)
  return train_sentencepiece(corpus, vocab_size, out_dir / "tokenizer", byte_fallback=False, seed=seed)


def init_model(tiny: TinyModel, tokenizer, seed: int) -> tuple[ModelConfig, dict]:
  vocab = 8 * math.ceil(tokenizer.vocab_size / 8)  # pad the vocab up to a multiple of 8
  config = tiny.config(vocab, tokenizer)
  return config, decoder.init_params(config, jax.random.key(seed))


def sft_pairs(task, n: int, seed: int) -> list[tuple[str, str]]:
  return [(p.prompt, task.sft_target(p)) for p in task.generate(n, seed=seed, split="train", unique=False)]


def fmt_ci(result: dict, key: str) -> str:
  lo, hi = result[f"{key}_ci95"]
  return f"{result[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def table(rows: dict[str, dict]) -> str:
  """A markdown table of pass@1 and greedy accuracy with 95% CIs."""
  lines = ["| model | pass@1 (T=1) [95% CI] | greedy [95% CI] | mean len |", "|---|---|---|---|"]
  for name, r in rows.items():
    lines.append(f"| {name} | {fmt_ci(r, 'pass1')} | {fmt_ci(r, 'greedy')} | {r['mean_len']:.1f} |")
  return "\n".join(lines)


def probe_table(probes: dict[str, dict]) -> str:
  """A markdown table of `evaluate.answer_probe` results: what each model answers and how sure it is."""
  some = next(iter(probes.values()))
  lines = [f"| model ({some['problems']} problems x {some['samples']} samples) | distinct answers / problem | "
           "distinct overall | top-3 share | top-3 answers | self-certainty | entropy |", "|---|---|---|---|---|---|---|"]
  for name, p in probes.items():
    lines.append(f"| {name} | {p['distinct_per_problem']:.2f} | {p['distinct_overall']} | {p['top3_share']:.2f} | "
                 f"{', '.join(p['top3'])} | {p['self_certainty']:.3f} | {p['entropy']:.3f} |")
  return "\n".join(lines)


def compact(result: dict) -> dict:
  keep = ("pass1", "pass1_ci95", "greedy", "greedy_ci95", "mean_len", "n")
  return {k: result[k] for k in keep if k in result}


def write_result(run_dir: Path, result: dict, filename: str = "results.json") -> None:
  """Write the result to run_dir/filename, then print the same object as the last stdout line."""
  Path(run_dir).mkdir(parents=True, exist_ok=True)
  (Path(run_dir) / filename).write_text(json.dumps(result, indent=2))
  print(json.dumps(result), flush=True)
