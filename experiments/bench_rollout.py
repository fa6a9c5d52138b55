"""Benchmark: the continuous-batching engine against the static sampler on long-tailed completion lengths.

  python -m experiments.bench_rollout                   # bench_sampler's model, 16 slots, N = 1024
  python -m experiments.bench_rollout --layout qwen05b --max-new-tokens 256 --slots 8   # the 0.5B-class layout

Same random model, slot count (the static batch is `slots` rows), token budget N and per-row keys for both engines.
Completion lengths are log-normal with a p99 / median ratio of 10, the shape of reasoning-RL rollout lengths as
summarised in "Long-tail rollouts" (rl_lessons 22b, jiahuanglin.xyz: median ~500, p99 ~5,000 tokens for a typical
reasoning-RL run; APRIL, arXiv 2509.18521, describes the same long tail), scaled so the p99 is N and clipped to
[1, N]. A random model never stops on its own, so each row gets its drawn length as its token budget (the static
sampler's `budget_B`, the engine's `Request.max_new_tokens`). Requests number 4x the slots, G samples each.

Reported: useful (generated) tokens/s per engine over the same rows, slot utilisation (generated tokens / slot-steps,
a slot-step being one row of a decode step's batch) of both, the continuous engine's time breakdown (prefill_share:
refill calls, prefill and copy into slots; decode_share: decode calls and the flag read that ends each; read_share:
finished rows to the host) with its call counts, compiles after warm-up (traces of the jitted functions
while timing a length mix the warm-up did not see), and whether both engines emitted the same tokens
(`tokens_match`: fraction of rows, same keys). Timings are medians of `repeats` interleaved runs.
The last stdout line is the JSON result, also written to runs/bench_rollout/result.json.

Runtime: ~17 min on the 2-core dev box under heavy load (load average 22-26; warm-up ~13 min, compiles included).
Measured there, seed 0, 1 repeat:
  {"continuous_over_static": 2.8, "slot_utilisation": 0.96, "static_utilisation": 0.261, "prefill_share": 0.029,
   "decode_share": 0.966, "compiles_after_warmup": 0, "tokens_match": 0.89, "static_tok_s": 41.7,
   "continuous_tok_s": 116.9, ...}
  --slots 64 --max-new-tokens 8 (quickstart-sized, 2 repeats): continuous_over_static 1.02, slot_utilisation 0.959,
  static 0.231, prefill_share 0.538. See docs/rollout.md for the breakdown.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import jax
import numpy as np
import tyro

from experiments import common

from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.rollout import continuous, sampler

LAYOUTS = {
    # bench_sampler's tiny Qwen2 (vocab 32000, hidden 256, 4 layers, 4 heads / 2 kv heads, tied embeddings)
    "bench": dict(vocab_size=32000, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=64),
    # Qwen2.5-0.5B's shapes (random weights)
    "qwen05b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                    num_kv_heads=2, head_dim=64),
}
_Z99 = 2.3263  # standard normal 99th percentile


@dataclasses.dataclass(frozen=True)
class Args:
  layout: str = "bench"
  slots: int = 16
  max_new_tokens: int = 1024
  prompt_len: int = 32
  group_size: int = 1  # samples per request
  p99_over_median: float = 10.0
  refill_min_free: int = 1
  repeats: int = 2
  seed: int = 0
  out_dir: str = "runs/bench_rollout"


def draw_lengths(rng: np.random.Generator, n: int, max_new: int, p99_over_median: float) -> np.ndarray:
  """n log-normal lengths with p99 = max_new and p99 / median = p99_over_median, clipped to [1, max_new]."""
  sigma = np.log(p99_over_median) / _Z99
  median = max_new / p99_over_median
  return np.clip(np.rint(rng.lognormal(np.log(median), sigma, n)), 1, max_new).astype(np.int32)


def make_mix(rng, args: Args, config: ModelConfig):
  """Requests (4x slots, G samples each) with per-row budgets from the long-tailed distribution."""
  U = 4 * args.slots // args.group_size
  lens = draw_lengths(rng, U * args.group_size, args.max_new_tokens, args.p99_over_median)
  prompts = [rng.integers(3, config.vocab_size, rng.integers(args.prompt_len // 2, args.prompt_len + 1)).tolist()
             for _ in range(U)]
  keys = [jax.random.key(int(rng.integers(1 << 31))) for _ in range(U)]
  return prompts, keys, lens


def run_static(config, params, sampling, args: Args, prompts, keys, lens):
  """The static sampler over the rows in batches of `slots`: each batch decodes until its longest row ends."""
  G, S = args.group_size, args.slots
  keys_B = continuous.row_keys(keys, [G] * len(prompts))
  per = S // G  # prompts per static batch
  toks, steps = [], 0
  for i in range(0, len(prompts), per):
    tok, val = sampler.pad_prompts(prompts[i:i + per], 0, args.prompt_len)
    rows = slice(i * G, (i + per) * G)
    out = sampler.sample(config, params, tok, val, None, sampling, G, keys_B=keys_B[rows], budget_B=lens[rows])
    toks.append(np.asarray(out.tokens_BxN))
    steps += int(lens[rows].max())
  return np.concatenate(toks), steps * S


def run_continuous(config, params, sampling, args: Args, prompts, keys, lens):
  G = args.group_size
  reqs = [continuous.Request(p, G, lens[u * G:(u + 1) * G], k) for u, (p, k) in enumerate(zip(prompts, keys))]
  res, stats = continuous.run(config, params, reqs, sampling, slots=args.slots, prompt_len=args.prompt_len,
                              refill_min_free=args.refill_min_free)
  return np.stack([r.tokens for rows in res for r in rows]), stats


def main(args: Args) -> dict:
  if args.layout not in LAYOUTS or args.slots % args.group_size:
    raise ValueError(f"layout={args.layout!r} must be one of {sorted(LAYOUTS)} and slots={args.slots} a multiple of "
                     f"group_size={args.group_size}")
  config = ModelConfig(**LAYOUTS[args.layout], model_type="qwen2", qkv_bias=True, tie_word_embeddings=True,
                       max_position_embeddings=args.prompt_len + args.max_new_tokens, pad_token_id=0)
  params = decoder.init_params(config, jax.random.key(args.seed))
  sampling = sampler.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, stop_token_ids=())
  rng = np.random.default_rng(args.seed)

  mix = lambda: make_mix(rng, args, config)

  t0 = time.perf_counter()
  warm = mix()
  run_static(config, params, sampling, args, *warm)
  continuous.warmup(config, params, sampling, args.slots, args.prompt_len)  # every width and refill bucket
  run_continuous(config, params, sampling, args, *warm)
  warmup_s = time.perf_counter() - t0
  traces0 = (sampler.TRACE_COUNT[0], sum(continuous.TRACE_COUNT.values()))
  prompts, keys, lens = mix()

  wall = {"static": [], "continuous": []}
  last = {}
  for _ in range(args.repeats):  # one length mix for every repeat (the warm-up's differs); engines interleaved
    t = time.perf_counter()
    static_tokens, static_slot_steps = run_static(config, params, sampling, args, prompts, keys, lens)
    wall["static"].append(time.perf_counter() - t)
    t = time.perf_counter()
    cont_tokens, stats = run_continuous(config, params, sampling, args, prompts, keys, lens)
    wall["continuous"].append(time.perf_counter() - t)
    useful = int(lens.sum())
    assert stats.generated == useful, (stats.generated, useful)
    last = dict(useful=useful, static_util=useful / static_slot_steps, stats=stats,
                match=float(np.mean([np.array_equal(a[:n], b[:n]) for a, b, n in zip(static_tokens, cont_tokens, lens)])))
  compiles = sampler.TRACE_COUNT[0] - traces0[0] + sum(continuous.TRACE_COUNT.values()) - traces0[1]
  tok = last["useful"]
  med = {k: statistics.median(v) for k, v in wall.items()}
  stats = last["stats"]
  result = {"layout": args.layout, "slots": args.slots, "max_new_tokens": args.max_new_tokens,
            "group_size": args.group_size, "requests": 4 * args.slots // args.group_size,
            "mean_len": round(tok / (4 * args.slots), 1),
            "static_tok_s": round(tok / med["static"], 1), "continuous_tok_s": round(tok / med["continuous"], 1),
            "continuous_over_static": round(med["static"] / med["continuous"], 2),
            "slot_utilisation": round(stats.utilisation, 3), "static_utilisation": round(last["static_util"], 3),
            "prefill_share": round(stats.refill_s / stats.wall_s, 3),
            "decode_share": round(stats.decode_s / stats.wall_s, 3), "read_share": round(stats.read_s / stats.wall_s, 3),
            "decode_calls": stats.decode_calls, "refills": stats.refills, "compactions": stats.compactions,
            "decode_steps": stats.decode_steps, "compiles_after_warmup": compiles,
            "tokens_match": last["match"], "warmup_s": round(warmup_s, 1),
            "wall_s": {k: [round(x, 2) for x in v] for k, v in wall.items()}, "seed": args.seed,
            "repeats": args.repeats}
  common.write_result(Path(args.out_dir), result, "result.json")
  return result


if __name__ == "__main__":
  main(tyro.cli(Args))
