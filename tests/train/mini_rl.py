"""A tiny RL run used by the resume and learning tests (also runnable as a subprocess).

  python -m tests.train.mini_rl RUN_DIR [STEPS] [SOURCE]     # SOURCE: task (default) | hardest
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

import numpy as np

from experiments import common
from exrl.curriculum.source import TaskSource
from exrl.rl.losses import LossConfig
from exrl.rollout.sampler import SamplingConfig
from exrl.tasks import get_task
from exrl.infra.rng import host_rng_state, set_host_rng_state
from exrl.train.evaluate import EvalConfig
from exrl.train.rl_loop import RLConfig, train_rl
from exrl.train.state import OptimConfig

TINY = common.TinyModel(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64)


def starts_with_one(response: str, problem) -> float:
  """A trivially learnable reward: 1 when the response starts with the digit 1."""
  del problem
  return float(response.startswith("1"))


class HardestSource:
  """A stateful toy source: draws from a fixed pool, weighting each problem by 1 + its failures so far.

  Its state (failure counts and the host RNG) must survive a kill for a resumed run to draw the same
  problems. Every draw is appended to `log_path` as {"step", "prompts"}.
  """

  def __init__(self, problems, log_path: Path, seed: int = 0):
    self.problems, self.log_path = list(problems), log_path
    self.failures = [0] * len(self.problems)
    self.rng = random.Random(seed)

  def batch(self, step: int, n: int):
    picks = self.rng.choices(range(len(self.problems)), weights=[1 + f for f in self.failures], k=n)
    self._last = picks
    with open(self.log_path, "a") as f:
      f.write(json.dumps({"step": step, "prompts": [self.problems[i].prompt for i in picks]}) + "\n")
    return [self.problems[i] for i in picks]

  def update(self, problems, experience) -> None:
    for p_idx, r in zip(experience.traces["problem"], experience.traces["reward"]):
      self.failures[self._last[int(p_idx)]] += int(r < 0.5)

  def state_dict(self) -> dict:
    return {"failures": list(self.failures), "rng": host_rng_state(self.rng)}

  def load_state_dict(self, state: dict) -> None:
    self.failures = list(state["failures"])
    set_host_rng_state(self.rng, state["rng"])


def run(run_dir: str, steps: int = 6, lr: float = 1e-3, verify=None, reward: str = "verifier", seed: int = 0,
        eval_n: int = 0, source: str = "task", **overrides):
  task = get_task("arithmetic", digits=1, ops="+")
  tokenizer = common.build_tokenizer([task], Path(run_dir), seed=0)
  config, params = common.init_model(TINY, tokenizer, seed)
  cfg = RLConfig(run_dir=run_dir, steps=steps, prompts_per_step=4, group_size=4, reward=reward, seed=seed,
                 sampling=SamplingConfig(max_new_tokens=4), loss=LossConfig(kl_beta=0.01),
                 optim=OptimConfig(lr=lr, warmup_frac=0.0, min_lr_ratio=1.0), checkpoint_every=1,
                 keep_checkpoints=2, eval=EvalConfig(batch_size=8, sampling=SamplingConfig(max_new_tokens=4)))
  cfg = dataclasses.replace(cfg, **overrides)
  evals = task.generate(eval_n, seed=0, split="eval") if eval_n else ()
  src = (TaskSource(task, seed=seed) if source == "task" else
         HardestSource(task.generate(12, seed=seed, split="train"), Path(run_dir) / "draws.jsonl", seed=seed))
  return train_rl(cfg, config, params, tokenizer, src, verify=verify, eval_problems=evals)


if __name__ == "__main__":
  state, _ = run(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 6,
                 source=sys.argv[3] if len(sys.argv) > 3 else "task")
  import jax
  flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  np.savez(Path(sys.argv[1]) / "final_params.npz", **flat)
