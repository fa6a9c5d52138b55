"""python -m experiments.bench_markov

Delethink (chunks of C tokens, carryover m = C/2) against one long context (LongCoT), on a tiny random
decoder, for thinking lengths L = C, 2C, 4C and 8C. No stop tokens, so every trace generates exactly L
tokens on both sides. For each L it measures:

  kv_bytes: the KV cache the generation allocates (keys, values, valid mask; from the shapes of the
            `init_cache` call the code makes: P + L slots for LongCoT, P + C for Delethink);
  temp_bytes: XLA's compiled temporary allocation for the whole generation (`memory_analysis`), which also
            holds logits, the decode-step activations and, for Delethink, the per-chunk row buffers;
  s_per_token: wall seconds per generated token (median of `repeats` runs after a warm-up run; compile
            excluded), timed alternately LongCoT / Delethink in one process because this box is noisy.

The last stdout line is JSON with delethink_mem_max_over_min (across L), mem_ratio_8C (Delethink's KV
bytes over LongCoT's at 8C), delethink_time_8C_over_2C and longcot_time_8C_over_2C, plus every row.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np
import tyro

from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.rollout import markov, sampler


@dataclasses.dataclass(frozen=True)
class Args:
  chunk: int = 64  # C; m = C/2
  head: int = 8  # h, the first response tokens kept once
  batch: int = 8
  prompt_len: int = 16
  repeats: int = 5
  seed: int = 0
  out_dir: str = "runs/bench_markov"


CONFIG = ModelConfig(vocab_size=512, hidden_size=192, intermediate_size=512, num_layers=4, num_heads=6,
                     num_kv_heads=2, head_dim=32, model_type="qwen2", qkv_bias=True,
                     max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=0)


def _compiled(fn, *args):
  """(compiled executable, its temp bytes)."""
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  return compiled, int(getattr(mem, "temp_size_in_bytes", 0) or 0)


def _time(compiled, args, out_field) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(getattr(compiled(*args), out_field))
  return time.perf_counter() - t0


def main(args: Args) -> dict:
  C, m = args.chunk, args.chunk // 2
  params = decoder.init_params(CONFIG, jax.random.key(args.seed))
  rng = np.random.default_rng(args.seed)
  tokens = rng.integers(1, CONFIG.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
  valid = np.ones_like(tokens, bool)
  key = jax.random.key(args.seed)
  B, P = tokens.shape
  rows, result = [], {}
  for mult in (1, 2, 4, 8):
    L = mult * C
    mk = markov.MarkovConfig.for_budget(L, C, m, args.head)
    assert mk.budget == L, (mk, L)
    sampling = sampler.SamplingConfig(max_new_tokens=L, temperature=1.0)  # no stop ids: always L tokens
    long_fn = lambda p, t, v, k, s=sampling: sampler.generate(CONFIG, s, p, t, v, k)
    dt_fn = lambda p, t, v, k, s=sampling, mk=mk: markov.generate_markov(CONFIG, s, mk, p, t, v, k)
    call = (params, tokens, valid, key)
    long_c, long_temp = _compiled(long_fn, *call)
    dt_c, dt_temp = _compiled(dt_fn, *call)
    _time(long_c, call, "tokens_BxN"), _time(dt_c, call, "tokens_BxIxS")  # warm-up
    long_t, dt_t = [], []
    for _ in range(args.repeats):
      long_t.append(_time(long_c, call, "tokens_BxN"))
      dt_t.append(_time(dt_c, call, "tokens_BxIxS"))
    out = dt_c(*call)
    assert int(np.asarray(out.lengths_B).min()) == L and int(np.asarray(out.num_chunks_B).min()) == mk.max_chunks
    row = {"L": L, "chunks": mk.max_chunks,
           "longcot_kv_bytes": markov.kv_cache_bytes(CONFIG, B, P + L),
           "delethink_kv_bytes": markov.kv_cache_bytes(CONFIG, B, P + C),
           "longcot_temp_bytes": long_temp, "delethink_temp_bytes": dt_temp,
           "longcot_s_per_token": statistics.median(long_t) / (B * L),
           "delethink_s_per_token": statistics.median(dt_t) / (B * L)}
    rows.append(row)
    print(f"[bench_markov] L={L:4d} ({mk.max_chunks:2d} chunks)  KV bytes long {row['longcot_kv_bytes']:>9,d} "
          f"delethink {row['delethink_kv_bytes']:>9,d}  temp bytes long {long_temp:>10,d} delethink {dt_temp:>10,d}  "
          f"us/token long {1e6 * row['longcot_s_per_token']:7.1f} delethink {1e6 * row['delethink_s_per_token']:7.1f}",
          flush=True)
  by_L = {r["L"] // C: r for r in rows}
  dt_kv = [r["delethink_kv_bytes"] for r in rows]
  result = {
      "delethink_mem_max_over_min": max(dt_kv) / min(dt_kv),
      "mem_ratio_8C": by_L[8]["delethink_kv_bytes"] / by_L[8]["longcot_kv_bytes"],
      "delethink_time_8C_over_2C": by_L[8]["delethink_s_per_token"] / by_L[2]["delethink_s_per_token"],
      "longcot_time_8C_over_2C": by_L[8]["longcot_s_per_token"] / by_L[2]["longcot_s_per_token"],
      "delethink_temp_max_over_min": max(r["delethink_temp_bytes"] for r in rows) / max(
          min(r["delethink_temp_bytes"] for r in rows), 1),
      "longcot_temp_8C_over_C": by_L[8]["longcot_temp_bytes"] / max(by_L[1]["longcot_temp_bytes"], 1),
      "C": C, "m": m, "head": args.head, "batch": B, "prompt_len": P, "rows": rows,
  }
  out_dir = Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "results.json").write_text(json.dumps(result, indent=2))
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main(tyro.cli(Args))
