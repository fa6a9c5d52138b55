"""Asynchronous RL with bounded staleness on the quickstart task: GRPO at max_lag k in {0, 2, 8}.

  python -m experiments.async_rl                       # 8 host devices: the worker's params on 4 of them
  python -m experiments.async_rl --steps 100 --lags 0 8

The quickstart's recipe (tokenizer, SFT base, GRPO with the verifier reward) with one RL arm per k, all from the same
base and seed. Every arm splits the mesh: the rollout worker on the last `rollout_devices` host devices
(`--rl.mesh.rollout-devices`), the train step on the others. k = 0 runs the worker in lockstep (the synchronous
loop's semantics, bitwise); k > 0 runs it in the free schedule with in-flight weight switches.

On a CPU, the 8 "devices" are threads of one process sharing the machine's cores, so generation and training
compete for the same cores: this measures staleness's effect on accuracy and the scheduler's bookkeeping, not the
speed-up real overlap gives on separate accelerators. A 2-core CPU cannot show that overlap.

Reported per arm: pass@1 (T=1) and greedy accuracy on held-out problems with 95% Wilson CIs, mean seconds per step
(steps after the first, which compiles), mean trainer / generator idle fractions and the mean lag. The last stdout
line is the JSON result, also written to run_dir/results.json.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax starts

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tyro  # noqa: E402

from experiments import common  # noqa: E402
from experiments import quickstart  # noqa: E402
from exrl import cli  # noqa: E402
from exrl.curriculum.source import TaskSource  # noqa: E402
from exrl.infra import runlock  # noqa: E402
from exrl.train.evaluate import evaluate  # noqa: E402
from exrl.train.rl_loop import train_rl  # noqa: E402
from exrl.train.sft import train_sft  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
  qs: quickstart.Config = quickstart.Config(run_dir="runs/async_rl")
  lags: tuple[int, ...] = (0, 2, 8)
  steps: int = 200
  rollout_devices: int = 4


def _timing_means(run_dir: Path) -> dict:
  lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
  mean = lambda xs: round(float(np.mean(xs)), 3) if xs else None
  return {"step_s": mean([r["timing"]["step_s"] for r in lines]),
          **{k: mean([r["timing"][k] for r in lines if k in r["timing"]])
             for k in ("trainer_idle_frac", "generator_idle_frac")},
          "lag_mean": mean([r["metrics"].get("lag/mean", 0.0) for r in lines])}


@runlock.holding(lambda cfg: cfg.qs.run_dir)
def main(cfg: Config) -> dict:
  t0 = time.time()
  qs = cfg.qs
  run_dir = Path(qs.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  task = quickstart.task_for(qs)
  tokenizer = common.build_tokenizer([task], run_dir, seed=qs.seed)
  model_config, params = common.init_model(qs.model, tokenizer, qs.seed)
  eval_problems = task.generate(qs.eval_problems, seed=qs.seed, split="eval")
  eval_cfg = dataclasses.replace(qs.rl.eval, seed=qs.seed + 1)
  sft = dataclasses.replace(qs.sft, run_dir=str(run_dir / "sft"), seed=qs.seed)
  base = train_sft(sft, model_config, params, tokenizer, common.sft_pairs(task, qs.sft_examples, qs.seed)).params
  results = {"base": evaluate(model_config, base, tokenizer, eval_problems, task.verify, eval_cfg)}
  timings = {}
  for k in cfg.lags:
    name = f"k{k}"
    rl = quickstart.rl_config(qs, name, "verifier")
    rl = dataclasses.replace(rl, steps=cfg.steps, max_lag=k,
                             mesh=dataclasses.replace(rl.mesh, rollout_devices=cfg.rollout_devices))
    print(f"[async_rl] arm {name}: max_lag={k} rollout_devices={rl.mesh.rollout_devices}", flush=True)
    _, results[name] = train_rl(rl, model_config, base, tokenizer, TaskSource(task, seed=qs.seed),
                                eval_problems=eval_problems, verify=task.verify)
    timings[name] = _timing_means(run_dir / name)
  print("\n" + common.table(results), flush=True)
  out = {name: {**common.compact(r), **timings.get(name, {})} for name, r in results.items()}
  out.update(runtime_s=round(time.time() - t0, 1), seed=qs.seed, eval_problems=len(eval_problems), steps=cfg.steps,
             rollout_devices=cfg.rollout_devices, task=str(task), devices="8 host CPU devices on a 2-core machine")
  common.write_result(run_dir, out)
  return out


if __name__ == "__main__":
  cli.run(lambda: main(tyro.cli(Config)))
