"""python -m experiments.bench_lora_sampler

How the sampler should run a LoRA policy: the adapter applied on the fly ((x @ A) @ B added inside each layer,
`lora.combine`; what the RL loop does) against the adapter merged into dense weights once per RL step
(`lora.merge`, then the plain sampler). Same random Qwen2 layout as bench_sampler (vocab 32000, hidden 256,
mlp 704, 4 layers), rank 16 on all seven projections, batch 16, prompt 32, 128 new tokens; medians of repeats
measured side by side in one run, compile excluded; the merge's own time is reported apart (it is paid once per
RL step), and the merged copy's bytes (what on-the-fly does not hold).
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import tyro

from exrl.models import decoder, lora
from exrl.models.config import ModelConfig
from exrl.rollout.sampler import SamplingConfig, sample


@dataclasses.dataclass(frozen=True)
class Args:
  rank: int = 16
  batch: int = 16
  prompt_len: int = 32
  new_tokens: int = 128
  repeats: int = 5
  out_dir: str = "runs/bench_lora_sampler"


def main(args: Args) -> dict:
  config = ModelConfig(vocab_size=32000, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                       num_kv_heads=2, head_dim=64, qkv_bias=True)
  base = decoder.init_params(config, jax.random.key(0))
  cfg = lora.LoraConfig(rank=args.rank)
  adapter = lora.init_adapter(config, cfg, jax.random.key(1))
  adapter = jax.tree.map(lambda x: x + 0.01, adapter)  # B != 0, as after training
  prompts = jax.random.randint(jax.random.key(2), (args.batch, args.prompt_len), 3, config.vocab_size)
  valid = jnp.ones(prompts.shape, bool)
  sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0)
  merge = jax.jit(lambda b, a: lora.merge(b, a, cfg))
  arms = {"on_the_fly": lambda: lora.combine(base, adapter, cfg), "merged": lambda: merge(base, adapter)}
  times = {k: [] for k in arms}
  merge_s = []
  for _ in range(args.repeats + 1):  # the first round compiles
    for name, params_fn in arms.items():
      t0 = time.perf_counter()
      params = jax.block_until_ready(params_fn())
      t1 = time.perf_counter()
      jax.block_until_ready(sample(config, params, prompts, valid, jax.random.key(3), sampling).tokens_BxN)
      times[name].append(time.perf_counter() - t1)
      if name == "merged":
        merge_s.append(t1 - t0)
  med = {k: statistics.median(v[1:]) for k, v in times.items()}
  tokens = args.batch * args.new_tokens
  merged_bytes = sum(base["layers"][n].nbytes for n in lora.target_names(cfg))
  out = {"on_the_fly_tok_s": round(tokens / med["on_the_fly"], 1), "merged_tok_s": round(tokens / med["merged"], 1),
         "on_the_fly_over_merged_time": round(med["on_the_fly"] / med["merged"], 3),
         "merge_s": round(statistics.median(merge_s[1:]), 4), "merged_copy_mb": round(merged_bytes / 2**20, 1),
         "rank": args.rank, "repeats": args.repeats}
  out_dir = Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "result.json").write_text(json.dumps(out, indent=2))
  print(json.dumps(out), flush=True)
  return out


if __name__ == "__main__":
  main(tyro.cli(Args))
