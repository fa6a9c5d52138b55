"""A tiny RL run used by the resume and learning tests (also runnable as a subprocess).

  python -m tests.train.mini_rl RUN_DIR [STEPS]
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from experiments import common
from exrl.curriculum.source import TaskSource
from exrl.rl.losses import LossConfig
from exrl.rollout.sampler import SamplingConfig
from exrl.tasks import get_task
from exrl.train.evaluate import EvalConfig
from exrl.train.rl_loop import RLConfig, train_rl
from exrl.train.state import OptimConfig

TINY = common.TinyModel(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64)


def starts_with_one(response: str, problem) -> float:
  """A trivially learnable reward: 1 when the response starts with the digit 1."""
  del problem
  return float(response.startswith("1"))


def run(run_dir: str, steps: int = 6, lr: float = 1e-3, verify=None, reward: str = "verifier", seed: int = 0,
        eval_n: int = 0, **overrides):
  task = get_task("arithmetic", digits=1, ops="+")
  tokenizer = common.build_tokenizer([task], Path(run_dir), seed=0)
  config, params = common.init_model(TINY, tokenizer, seed)
  cfg = RLConfig(run_dir=run_dir, steps=steps, prompts_per_step=4, group_size=4, reward=reward, seed=seed,
                 sampling=SamplingConfig(max_new_tokens=4), loss=LossConfig(kl_beta=0.01),
                 optim=OptimConfig(lr=lr, warmup_frac=0.0, min_lr_ratio=1.0), checkpoint_every=1,
                 keep_checkpoints=2, eval=EvalConfig(batch_size=8, max_new_tokens=4))
  cfg = dataclasses.replace(cfg, **overrides)
  evals = task.generate(eval_n, seed=0, split="eval") if eval_n else ()
  return train_rl(cfg, config, params, tokenizer, TaskSource(task, seed=seed), verify=verify, eval_problems=evals)


if __name__ == "__main__":
  state, _ = run(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 6)
  import jax
  flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  np.savez(Path(sys.argv[1]) / "final_params.npz", **flat)
