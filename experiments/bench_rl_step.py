"""Benchmark: one GRPO step, stage by stage, against this machine's own dense-matmul peak.

  python -m experiments.bench_rl_step                       # ~27M-param model, 8 prompts x 8, <= 32 new tokens
  python -m experiments.bench_rl_step --max-new-tokens 256  # long completions: sampling dominates

Runs `train_rl` for `steps` GRPO steps (verifier reward on two-digit addition, β 0.04) from a random model and
reads the per-stage timings the loop logs (sample, score, reward, update seconds; measured where the host
already waits for the device). Reports the first step (compile included) and the median of the later ones,
completion tokens/s, and MFUs: the update's model FLOPs (6 · params · slots + attention, over the token slots
it runs on: packed bins, or padded rows with --pack-width 0) and the sampler's (2 · params · tokens +
attention) over the peak of a large `jnp.dot` at the same dtype, timed in this run. A "steady" step that meets
a new bin count compiles it (a few seconds); the median keeps most of that out.
The last stdout line is the JSON result, also written to runs/bench_rl_step/result.json.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import tyro

from experiments import common
from exrl import cli
from exrl.curriculum.source import TaskSource
from exrl.rl.losses import LossConfig
from exrl.rollout.sampler import SamplingConfig
from exrl.tasks import get_task
from exrl.infra import runlock
from exrl.infra.metrics import read_jsonl
from exrl.train.rl_loop import RLConfig, train_rl
from exrl.train.state import OptimConfig


@dataclasses.dataclass(frozen=True)
class Config:
  out_dir: str = "runs/bench_rl_step"
  model: common.TinyModel = common.TinyModel(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
                                             head_dim=64, intermediate_size=1536)
  steps: int = 6  # the first compiles; the median of the rest is the steady step
  prompts_per_step: int = 8
  group_size: int = 8
  max_new_tokens: int = 32
  kl_beta: float = 0.04
  pack_width: int = 128  # RLConfig.pack_width: the update on packed bins; 0 trains the padded rows
  compute_dtype: str = "float32"  # bfloat16: mixed precision (fp32 params and optimizer, bf16 matmuls)
  seed: int = 0


def matmul_peak_flops(n: int = 2048, dtype=jnp.float32, reps: int = 5) -> float:
  """FLOP/s of an [n, n] @ [n, n] product at `dtype` on the default device (best of `reps`)."""
  a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def model_flops(config, tokens: float, seq_len: float, factor: int) -> float:
  """factor * params * tokens (2: forward, 6: forward + backward) plus attention's QK^T and AV."""
  n_params = config.num_layers * (
      config.hidden_size * config.head_dim * (config.num_heads * 2 + config.num_kv_heads * 2)
      + 3 * config.hidden_size * config.intermediate_size) + config.vocab_size * config.hidden_size
  attn = config.num_layers * 2 * 2 * config.num_heads * config.head_dim * seq_len  # per token
  return factor * n_params * tokens + (factor // 2) * attn * tokens


@runlock.holding(lambda cfg: cfg.out_dir)  # one live launch per run dir, set-up to last write
def main(cfg: Config) -> dict:
  out_dir = Path(cfg.out_dir)
  run_dir = out_dir / "run"
  shutil.rmtree(run_dir, ignore_errors=True)  # a benchmark never resumes
  task = get_task("arithmetic", digits=2, ops="+")
  tokenizer = common.build_tokenizer([task], out_dir, seed=cfg.seed)
  model_config, params = common.init_model(cfg.model, tokenizer, cfg.seed)
  model_config = dataclasses.replace(model_config, compute_dtype=cfg.compute_dtype)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"[bench_rl_step] model {n_params / 1e6:.1f}M params, {cfg.prompts_per_step}x{cfg.group_size} rollouts, "
        f"<= {cfg.max_new_tokens} new tokens, {cfg.steps} steps", flush=True)
  peak = matmul_peak_flops(dtype=model_config.dtype)
  rl = RLConfig(run_dir=str(run_dir), steps=cfg.steps, prompts_per_step=cfg.prompts_per_step,
                group_size=cfg.group_size, seed=cfg.seed, sampling=SamplingConfig(max_new_tokens=cfg.max_new_tokens),
                loss=LossConfig(kl_beta=cfg.kl_beta), optim=OptimConfig(lr=1e-5), checkpoint_every=cfg.steps,
                pack_width=cfg.pack_width)
  t0 = time.perf_counter()
  train_rl(rl, model_config, params, tokenizer, TaskSource(task, seed=cfg.seed))
  wall = time.perf_counter() - t0
  rows = read_jsonl(run_dir / "metrics.jsonl")
  timing = [r["timing"] for r in rows]
  steady = timing[1:] or timing
  med = lambda k: statistics.median(t.get(k, float("nan")) for t in steady)
  rollouts = cfg.prompts_per_step * cfg.group_size
  comp_tokens = statistics.median(r["metrics"]["response_len"] for r in rows[1:] or rows) * rollouts
  width = med("width")  # the rows' width (prompt bucket + completion bucket)
  # The update's FLOPs are those of the slots it runs on (padded rows, or packed bins of train_width tokens).
  update_flops = model_flops(model_config, med("train_slots"), med("train_width"), 6)
  sample_flops = model_flops(model_config, comp_tokens, width, 2)
  result = {
      "params_M": round(n_params / 1e6, 2), "rollouts": rollouts, "max_new_tokens": cfg.max_new_tokens,
      "first_step_s": round(timing[0]["step_s"], 3), "step_s": round(med("step_s"), 3),
      **{k: round(med(k), 3) for k in ("sample_s", "score_s", "reward_s", "update_s")},
      "completion_tokens_per_s": round(comp_tokens / med("sample_s"), 1), "row_width": width,
      **{k: med(k) for k in ("train_slots", "train_width")}, "train_fill": round(med("train_fill"), 3),
      "peak_gflops": round(peak / 1e9, 1),
      "update_mfu": round(update_flops / med("update_s") / peak, 3),
      "sample_mfu": round(sample_flops / med("sample_s") / peak, 3),
      "wall_s": round(wall, 1), "steps": cfg.steps, "seed": cfg.seed, "compute_dtype": cfg.compute_dtype,
      "pack_width": cfg.pack_width,
  }
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "result.json").write_text(json.dumps(result, indent=2))
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  cli.run(lambda: main(tyro.cli(Config)))
