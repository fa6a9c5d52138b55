"""SFT on (prompt, completion) pairs: loss on completion tokens only, through the same fused kernel,
train step, checkpoints and metrics as RL. Warm-starts tiny models and does AgentEvol behaviour cloning.
"""
from __future__ import annotations

import dataclasses
import functools
import random
import time
from typing import Callable, Sequence

import jax
import numpy as np

from exrl.models.config import ModelConfig
from exrl.models.lora import LoraConfig
from exrl.rollout.sampler import bucket_length
from exrl.infra import mesh as mesh_lib
from exrl.infra.resources import peak_rss_mb
from exrl.train.adapter import Adapter
from exrl.train.objectives import sft_loss_fn
from exrl.train.state import OptimConfig, TrainState, make_optimizer
from exrl.train.step import shard_batch
from exrl.infra.trackers import TrackerName, check_names as check_trackers
from exrl.train.trainer import check_mesh_batch, check_vocab, open_run, resolve_remat


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
  remat: bool | None = None  # None: on for models of >= 100M parameters (trainer.resolve_remat)
  fp32_head: bool = False  # the LM head (its input and unembedding) in fp32 when compute is bf16 (ScaleRL)
  vocab_parallel: bool = True  # mesh tensor > 1: each device streams only its vocab shard (kernels.sharded)
  restart: bool = False  # start over (damaged checkpoints are moved aside) when no checkpoint restores
  allow_config_change: bool = False  # resume under a config that changes the experiment; recorded (infra.lineage)
  trackers: tuple[TrackerName, ...] = ("tensorboard",)  # besides metrics.jsonl (exrl.infra.trackers)
  lora: LoraConfig = LoraConfig()  # rank > 0: train a LoRA adapter on the frozen base (exrl.train.adapter)

  def __post_init__(self):
    check_trackers(self.trackers, "SFTConfig.trackers")
    for name in ("steps", "batch_size", "num_microbatches", "max_len", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"SFTConfig.{name}={getattr(self, name)} must be >= 1")


def sft_rows(examples: Sequence[tuple[list[int], list[int]]], length: int) -> dict[str, np.ndarray]:
  """Right-padded rows from (prompt_ids, completion_ids); loss_mask marks completion tokens."""
  B = len(examples)
  tokens = np.zeros((B, length), np.int32)
  valid = np.zeros((B, length), bool)
  loss_mask = np.zeros((B, length), np.float32)
  for i, (prompt, completion, *explicit) in enumerate(examples):
    ids = (list(prompt) + list(completion))[:length]
    tokens[i, :len(ids)] = ids
    valid[i, :len(ids)] = True
    if explicit:  # (ids, [], mask): a per-token loss mask, e.g. agent tokens of a multi-turn trajectory
      loss_mask[i, :len(ids)] = np.asarray(explicit[0], np.float32)[:len(ids)]
    else:
      loss_mask[i, len(prompt):len(ids)] = 1.0
  positions = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
  return {"tokens": tokens, "valid": valid, "positions": positions, "loss_mask": loss_mask}


def train_sft(cfg: SFTConfig, model_config: ModelConfig, params, tokenizer,
              examples: Sequence[tuple[str, str]], *, encode: Callable | None = None,
              tokenized: Sequence[tuple[Sequence[int], Sequence[int]]] = ()) -> TrainState:
  """SFT (or resume it) in `cfg.run_dir` on text pairs (prompt, completion); completion gets eos appended.

  tokenized: more examples as (ids, loss_mask) with an explicit 0/1 mask per token (multi-turn agent data).
  """
  check_vocab(model_config, tokenizer)
  if not examples and not tokenized:
    raise ValueError("train_sft got no examples")
  encode = encode or (lambda s: tokenizer.encode(s, add_bos=True))
  ids = [(encode(p), tokenizer.encode(c) + [tokenizer.eos_id]) for p, c in examples]
  ids += [(list(t), [], list(m)) for t, m in tokenized]
  longest = max(len(e[0]) + len(e[1]) for e in ids)
  length = min(bucket_length(longest, 16), cfg.max_len)
  if cfg.batch_size % cfg.num_microbatches:
    raise ValueError(f"SFTConfig.batch_size={cfg.batch_size} is not divisible by num_microbatches={cfg.num_microbatches}")
  optimizer = make_optimizer(cfg.optim, cfg.steps)
  loss_fn = sft_loss_fn(model_config, remat=resolve_remat(cfg.remat, model_config), fp32_head=cfg.fp32_head,
                        mesh=mesh_lib.make_mesh(cfg.mesh) if cfg.vocab_parallel else None)
  adapter = Adapter(cfg.lora, model_config, params, cfg.seed)  # the identity unless cfg.lora.rank > 0
  with open_run(cfg.run_dir, cfg, model_config, adapter.trainable, optimizer=optimizer, loss_fn=adapter.wrap(loss_fn),
                seed=cfg.seed, mesh_config=cfg.mesh, keep_checkpoints=cfg.keep_checkpoints, total_steps=cfg.steps,
                bar_fields={"nll": "nll", "gnorm": "grad_norm"}, desc="sft", frozen_shardings_like_params=False,
                restart=cfg.restart, allow_config_change=cfg.allow_config_change, trackers=cfg.trackers) as run:
    check_mesh_batch(run.mesh, cfg.batch_size // cfg.num_microbatches, "SFTConfig.batch_size/num_microbatches")
    M = cfg.num_microbatches
    frozen = adapter.place_base(run.mesh, None) if cfg.lora.on else None
    if run.start:
      adapter.check_resume(run.meta)
    for step in range(run.start, cfg.steps):
      t0 = time.time()
      rows = sft_rows([ids[i] for i in _epoch_slice(len(ids), cfg.batch_size, step, cfg.seed)], length)
      batch = {k: v.reshape(M, cfg.batch_size // M, *v.shape[1:]) for k, v in rows.items()}
      run.state, metrics = run.step_fn(run.state, shard_batch(batch, run.mesh), frozen)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      run.writer.write(step + 1, metrics, {"step_s": time.time() - t0})
      run.bar.update(step + 1, metrics)
      if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
        run.save(step + 1, dict(adapter.meta))
    print(f"[sft] peak host RSS {peak_rss_mb():,.0f} MB", flush=True)
    return run.state


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
  order = list(range(n))
  random.Random(f"sft|{seed}|{epoch}").shuffle(order)
  return tuple(order)


def _epoch_slice(n: int, batch: int, step: int, seed: int) -> list[int]:
  """Deterministic shuffled epochs, so a resumed SFT run sees the same batches."""
  return [_epoch_order(n, seed, i // n)[i % n] for i in range(step * batch, step * batch + batch)]
