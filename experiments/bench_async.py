"""Benchmark of the bounded-staleness scheduler (exrl.train.async_rl) with TIMED STAND-INS, not a model.

  python -m experiments.bench_async                        # generate 60 ms, train 40 ms, 40 steps, k in {0, 1, 2, 8}
  python -m experiments.bench_async --generate-s 0.03 --train-s 0.05

Generation and training are `time.sleep` calls of the given lengths, jittered uniformly by +-jitter: they measure
the scheduler itself (thread hand-offs, version gates, queueing), not model speed. Sleeping releases the CPU, so the
two sides overlap even on a 2-core machine; real generation and training overlap only when they run on separate
devices (MeshConfig.rollout_devices), which a 2-core CPU cannot show.

For each k: seconds per step (after one warm-up step) against the synchronous sum generate + train and the overlap
bound max(generate, train), both from the stand-ins' measured durations (a loaded machine oversleeps), the ratio
step / max, and the mean trainer and generator idle fractions. k = 0 runs in lockstep (step ~ the sum); k >= 1
should be within 10% of the max. The last stdout line is the JSON result, also written to runs/bench_async/result.json.
"""
from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import numpy as np
import tyro

from experiments import common

from exrl.train import async_rl


@dataclasses.dataclass(frozen=True)
class Args:
  generate_s: float = 0.06  # stand-in generation time per batch
  train_s: float = 0.04  # stand-in update time per step
  jitter: float = 0.1  # each duration is drawn uniformly from (1 +- jitter) x its mean
  steps: int = 40
  lags: tuple[int, ...] = (0, 1, 2, 8)
  seed: int = 0
  out_dir: str = "runs/bench_async"


def run_one(args: Args, max_lag: int) -> dict:
  rng = random.Random(args.seed)
  draw = lambda mean: mean * rng.uniform(1 - args.jitter, 1 + args.jitter)
  gen_times = [draw(args.generate_s) for _ in range(args.steps)]
  train_times = [draw(args.train_s) for _ in range(args.steps)]

  gen_took, train_took = [0.0] * args.steps, [0.0] * args.steps  # measured: a loaded machine oversleeps

  def generate(step, version, params, box):
    t = time.perf_counter()
    time.sleep(gen_times[step])
    gen_took[step] = time.perf_counter() - t
    return step, np.full((1,), version)

  sched = async_rl.Scheduler(generate, max_lag=max_lag, start=0, steps=args.steps, params=0)
  step_s, trainer_idle, gen_idle, lags = [], [], [], []
  try:
    for step in range(args.steps):
      t0 = time.perf_counter()
      rollout, wait_s = sched.next(step)
      t = time.perf_counter()
      time.sleep(train_times[step])
      train_took[step] = time.perf_counter() - t
      sched.publish(step + 1, step + 1)
      dt = time.perf_counter() - t0
      if step:  # step 0 always waits for a whole generation
        step_s.append(dt)
        trainer_idle.append(wait_s / dt)
        gen_idle.append(min(sched.take_generator_idle_s() / dt, 1.0))
      else:
        sched.take_generator_idle_s()
      lags.append(step - int(rollout.min_version_G.min()))
  finally:
    sched.close()
  mean_step = float(np.mean(step_s))
  gen, train = np.mean(gen_took[1:]), np.mean(train_took[1:])
  return {"max_lag": max_lag, "step_s": round(mean_step, 4), "generate_s": round(gen, 4), "train_s": round(train, 4),
          "step_over_max": round(mean_step / max(gen, train), 3), "step_over_sum": round(mean_step / (gen + train), 3),
          "trainer_idle_frac": round(float(np.mean(trainer_idle)), 3),
          "generator_idle_frac": round(float(np.mean(gen_idle)), 3), "lag_max": max(lags),
          "lag_mean": round(float(np.mean(lags)), 2)}


def main(args: Args) -> dict:
  if min(args.generate_s, args.train_s) <= 0 or not 0 <= args.jitter < 1 or args.steps < 3:
    raise ValueError(f"generate_s={args.generate_s}, train_s={args.train_s} must be > 0, jitter={args.jitter} in "
                     f"[0, 1), steps={args.steps} >= 3")
  rows = [run_one(args, k) for k in args.lags]
  result = {"stand_ins": "time.sleep (not a model)", "generate_s": args.generate_s, "train_s": args.train_s,
            "sum_s": round(args.generate_s + args.train_s, 4), "max_s": max(args.generate_s, args.train_s),
            "jitter": args.jitter, "steps": args.steps, "seed": args.seed, "runs": rows,
            "overlap_within_10pct": all(r["step_over_max"] <= 1.10 for r in rows if r["max_lag"] >= 1)}
  common.write_result(Path(args.out_dir), result, "result.json")
  return result


if __name__ == "__main__":
  main(tyro.cli(Args))
