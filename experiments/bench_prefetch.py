"""Step time with and without the prefetch thread (exrl.curriculum.prefetch), measured side by side on CPU.

  python -m experiments.bench_prefetch

Each step builds a batch on the host (ExIt source draw of self-iteration problems from a filled buffer,
tokenise, pad, device_put) and runs a device step (forward + backward + SGD of the tiny decoder on it).
Sequential: build, then step. Prefetched: a worker thread builds batch i+1 while step i runs.
Reported: mean host build time, mean step time both ways, and the device idle time removed per step.
Measured result: see docs/results/exit.md.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from experiments import common
from exrl.curriculum.exit_source import ExItConfig, ExItSource
from exrl.curriculum.prefetch import Prefetcher
from exrl.curriculum.source import TaskSource
from exrl.models import decoder
from exrl.rollout.sampler import pad_prompts
from exrl.tasks import get_task
from exrl.tasks import self_iteration as si
from exrl.tokenizer import train_sentencepiece


@dataclasses.dataclass(frozen=True)
class Config:
  run_dir: str = "runs/bench_prefetch"
  steps: int = 30
  batch: int = 64
  model: common.TinyModel = common.TinyModel()
  seed: int = 0


def filled_source(seed: int) -> ExItSource:
  """An ExIt source whose buffer already holds histories, so draws build self-iteration prompts."""
  task = get_task("countdown")
  src = ExItSource(TaskSource(task, seed=seed), ExItConfig(capacity=256, min_size=1, p=0.75, seed=seed))
  rng = random.Random(seed)
  for p in task.generate(256, seed=seed + 1):
    src.buffer.insert(si.problem_to_dict(p), [[f"answer: {task.sft_target(p)[8:]}", rng.random()]], rng.random() / 4)
  return src


def main(cfg: Config) -> dict:
  run_dir = Path(cfg.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  task = get_task("countdown")
  pairs = [(si.build_prompt(p.prompt, "answer: 1+2*3", "improve"), task.sft_target(p))
           for p in task.generate(500, seed=0)]
  corpus = [t for pr in pairs for t in pr] + [p.prompt for p in task.generate(500, seed=1)]
  tokenizer = train_sentencepiece(corpus, 128, run_dir / "tokenizer", byte_fallback=False)
  config, params = common.init_model(cfg.model, tokenizer, cfg.seed)

  def build(source, step):
    problems = source.batch(step, cfg.batch)
    ids = [tokenizer.encode(p.prompt, add_bos=True) + tokenizer.encode(" " + p.answer) for p in problems]
    tokens, valid = pad_prompts(ids, tokenizer.pad_id, bucket=96)  # one shape: one compile
    return jax.device_put({"tokens": tokens, "valid": valid})

  @jax.jit
  def step_fn(params, batch):
    def loss(p):
      logits = decoder.logits(config, p, batch["tokens"], batch["valid"])
      logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
      nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
      m = batch["valid"][:, 1:].astype(jnp.float32)
      return jnp.sum(nll * m) / jnp.sum(m)
    l, g = jax.value_and_grad(loss)(params)
    return jax.tree.map(lambda a, b: a - 1e-3 * b, params, g), l

  # Warm up (compile), then time the host build alone and the device step alone.
  src = filled_source(cfg.seed)
  batch0 = build(src, 0)
  p, l = step_fn(params, batch0)
  jax.block_until_ready(l)
  t = time.perf_counter()
  for i in range(cfg.steps):
    jax.block_until_ready(build(src, i))
  build_s = (time.perf_counter() - t) / cfg.steps
  t = time.perf_counter()
  for i in range(cfg.steps):
    p, l = step_fn(p, batch0)
    jax.block_until_ready(l)
  device_s = (time.perf_counter() - t) / cfg.steps

  def run(prefetch: bool) -> float:
    source, p = filled_source(cfg.seed), params
    t = time.perf_counter()
    if prefetch:
      with Prefetcher(lambda i: build(source, i), depth=2, stop=cfg.steps) as pf:
        for batch in pf:
          p, l = step_fn(p, batch)
          jax.block_until_ready(l)
    else:
      for i in range(cfg.steps):
        p, l = step_fn(p, build(source, i))
        jax.block_until_ready(l)
    return (time.perf_counter() - t) / cfg.steps

  seq_s, pre_s = run(False), run(True)
  out = {"host_build_ms": round(1e3 * build_s, 2), "device_step_ms": round(1e3 * device_s, 2),
         "sequential_step_ms": round(1e3 * seq_s, 2), "prefetch_step_ms": round(1e3 * pre_s, 2),
         "idle_removed_ms": round(1e3 * (seq_s - pre_s), 2), "steps": cfg.steps, "batch": cfg.batch,
         "devices": str(jax.devices()[0].platform)}
  (run_dir / "result.json").write_text(json.dumps(out, indent=2))
  print(json.dumps(out), flush=True)
  return out


if __name__ == "__main__":
  main(tyro.cli(Config))
