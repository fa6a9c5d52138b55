"""SFT on (prompt, completion) pairs: loss on completion tokens only, through the same fused kernel,
train step, checkpoints and metrics as RL. Warm-starts tiny models and does AgentEvol behaviour cloning.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from exrl.models.config import ModelConfig
from exrl.rollout.sampler import bucket_length
from exrl.train import mesh as mesh_lib
from exrl.train.checkpoint import Checkpointer
from exrl.train.metrics import MetricsWriter, ProgressBar
from exrl.train.objectives import sft_loss_fn
from exrl.train.rl_loop import check_mesh_batch, check_vocab, setup_state
from exrl.train.state import OptimConfig, TrainState, make_optimizer
from exrl.train.step import make_train_step, shard_batch


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  run_dir: str = "runs/sft"
  steps: int = 200
  batch_size: int = 64
  num_microbatches: int = 1
  max_len: int = 64  # sequences are right-padded to a multiple of 16 up to this; longer ones are cut
  optim: OptimConfig = OptimConfig(lr=3e-3, warmup_frac=0.05)
  mesh: mesh_lib.MeshConfig = mesh_lib.MeshConfig()
  seed: int = 0
  checkpoint_every: int = 100
  keep_checkpoints: int = 1
  remat: bool = False


def sft_rows(examples: Sequence[tuple[list[int], list[int]]], length: int) -> dict[str, np.ndarray]:
  """Right-padded rows from (prompt_ids, completion_ids); loss_mask marks completion tokens."""
  B = len(examples)
  tokens = np.zeros((B, length), np.int32)
  valid = np.zeros((B, length), bool)
  loss_mask = np.zeros((B, length), np.float32)
  for i, (prompt, completion) in enumerate(examples):
    ids = (list(prompt) + list(completion))[:length]
    tokens[i, :len(ids)] = ids
    valid[i, :len(ids)] = True
    loss_mask[i, len(prompt):len(ids)] = 1.0
  positions = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
  return {"tokens": tokens, "valid": valid, "positions": positions, "loss_mask": loss_mask}


def train_sft(cfg: SFTConfig, model_config: ModelConfig, params, tokenizer,
              examples: Sequence[tuple[str, str]], *, encode: Callable | None = None) -> TrainState:
  """SFT (or resume it) in `cfg.run_dir` on text pairs (prompt, completion); completion gets eos appended."""
  check_vocab(model_config, tokenizer)
  if not examples:
    raise ValueError("train_sft got no examples")
  encode = encode or (lambda s: tokenizer.encode(s, add_bos=True))
  ids = [(encode(p), tokenizer.encode(c) + [tokenizer.eos_id]) for p, c in examples]
  longest = max(len(p) + len(c) for p, c in ids)
  length = min(bucket_length(longest, 16), cfg.max_len)
  if cfg.batch_size % cfg.num_microbatches:
    raise ValueError(f"SFTConfig.batch_size={cfg.batch_size} is not divisible by num_microbatches={cfg.num_microbatches}")
  run_dir = Path(cfg.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  check_mesh_batch(mesh, cfg.batch_size // cfg.num_microbatches, "SFTConfig.batch_size/num_microbatches")
  optimizer = make_optimizer(cfg.optim, cfg.steps)
  state, state_sh = setup_state(model_config, params, optimizer, cfg.seed, mesh)
  step_fn = make_train_step(sft_loss_fn(model_config, remat=cfg.remat), optimizer, mesh, state_sh, None)
  ckpt = Checkpointer(run_dir / "ckpt", keep=cfg.keep_checkpoints)
  start = ckpt.latest_step() or 0
  if start:
    state, _ = ckpt.restore(start, abstract_state=state)
    print(f"resumed SFT from step {start}", flush=True)
  writer = MetricsWriter(run_dir, resume_step=start if start else None)
  (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
  bar = ProgressBar(cfg.steps, {"nll": "nll", "gnorm": "grad_norm"}, initial=start, desc="sft")
  try:
    for step in range(start, cfg.steps):
      t0 = time.time()
      picks = _epoch_slice(len(ids), cfg.batch_size, step, cfg.seed)
      rows = sft_rows([ids[i] for i in picks], length)
      M = cfg.num_microbatches
      batch = {k: v.reshape(M, cfg.batch_size // M, *v.shape[1:]) for k, v in rows.items()}
      state, metrics = step_fn(state, shard_batch(batch, mesh), None)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      writer.write(step + 1, metrics, {"step_s": time.time() - t0})
      bar.update(step + 1, metrics)
      if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
        ckpt.save(step + 1, state, {"step": step + 1}, force=True)
  finally:
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  return state


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
  order = list(range(n))
  random.Random(f"sft|{seed}|{epoch}").shuffle(order)
  return tuple(order)


def _epoch_slice(n: int, batch: int, step: int, seed: int) -> list[int]:
  """Deterministic shuffled epochs, so a resumed SFT run sees the same batches."""
  return [_epoch_order(n, seed, i // n)[i % n] for i in range(step * batch, step * batch + batch)]
