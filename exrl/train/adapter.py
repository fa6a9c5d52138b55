"""What a LoRA run changes in the SFT / RL loops, behind one object that is the identity when LoRA is off.

  adapter = Adapter(cfg.lora, model_config, params, seed)
  open_run(..., adapter.trainable, loss_fn=adapter.wrap(loss_fn), frozen=adapter.base, ...)
  step_fn(state, batch, adapter.base) ; collect(adapter.policy(state.params), adapter.base, ...)

With LoRA on, the train state (and so the optimiser and every checkpoint) holds only the adapter; the base
(float32 as loaded, or bf16 / int8 / nf4 via `exrl.models.quant`) is the step's frozen argument and is also the
KL reference: the policy is the base with the adapter on, the reference the same arrays with it off, so no
second copy of the weights exists. Checkpoints record the base's path and a sha256 of its content; a resume
on another base is refused.
"""
from __future__ import annotations

import hashlib

import jax
import numpy as np

from exrl.infra import mesh as mesh_lib
from exrl.models import decoder, lora, quant
from exrl.models.config import ModelConfig


def content_hash(params) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes (all of them: a base fine-tuned anywhere differs)."""
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    h.update(f"{jax.tree_util.keystr(path)}|{np.dtype(x.dtype).name}|{tuple(x.shape)}|".encode())
    # Slice by slice: np.asarray on a whole jax.Array caches a host copy on it for the array's lifetime.
    step = max(1, (64 << 20) // max(1, x.nbytes // max(1, x.shape[0]))) if x.ndim else 1
    for i in range(0, x.shape[0] if x.ndim else 1, step):
      part = np.ascontiguousarray(np.asarray(x[i:i + step] if x.ndim else x))
      h.update(memoryview(part.reshape(-1).view(np.uint8)))
  return h.hexdigest()


class Adapter:
  """The trainable tree, the frozen base, the loss wrapper and the checkpoint record of one run."""

  def __init__(self, cfg: lora.LoraConfig, model_config: ModelConfig, params: dict, seed: int):
    self.cfg, self.model_config = cfg, model_config
    if not cfg.on:
      self.trainable, self.base, self.meta = params, params, {}
      return
    self.base_hash = content_hash(params)
    self.base = quant.quantize_base(params, cfg.base_dtype)
    self.trainable = lora.init_adapter(model_config, cfg, jax.random.fold_in(jax.random.key(seed), 0x10a))
    self.meta = {"lora": {"base_path": cfg.base_path, "base_hash": self.base_hash, "rank": cfg.rank,
                          "alpha": cfg.alpha, "targets": cfg.targets, "base_dtype": cfg.base_dtype}}
    n_base, n_adapter = lora.count(params), lora.count(self.trainable)
    print(f"[lora] rank {cfg.rank}, alpha {cfg.alpha} on {', '.join(lora.target_names(cfg))}: {n_adapter:,} trainable "
          f"params ({100 * n_adapter / n_base:.2f}% of {n_base:,}); the optimiser holds the adapter only; the "
          f"{cfg.base_dtype} base ({_mb(self.base)}) is frozen and is the KL reference", flush=True)

  def wrap(self, loss_fn):
    """(params, frozen, mb) -> loss_fn(policy params, frozen, mb); with LoRA `params` is the adapter and
    `frozen` the base (the RL loss reads it as its reference, the adapter off)."""
    if not self.cfg.on:
      return loss_fn
    return lambda adapter, base, mb: loss_fn(lora.combine(base, adapter, self.cfg), base, mb)

  def policy(self, trainable: dict) -> dict:
    """The params the sampler and evaluation run: the base with the adapter applied on the fly."""
    return lora.combine(self.base, trainable, self.cfg) if self.cfg.on else trainable

  def release(self) -> None:
    """Full fine-tuning with no reference read: forget the loaded tree once the train state holds its copy."""
    if self.cfg.on:
      raise ValueError("release() is for full fine-tuning; a LoRA run's base is its model and its reference")
    self.trainable = self.base = None

  def place_base(self, mesh, state_param_shardings) -> dict | None:
    """The frozen base on the mesh: with LoRA off, in the train state's param shardings (the reference as
    before; None once released), else in its own, from the (quantised) base's logical axes."""
    if self.base is None:
      return None
    if not self.cfg.on:
      return jax.device_put(self.base, state_param_shardings)
    axes = quant.quantized_axes(self.base, decoder.param_axes(self.model_config))
    self.base = jax.device_put(self.base, mesh_lib.param_shardings(self.base, axes, mesh))
    return self.base

  def check_resume(self, meta: dict) -> None:
    """Refuse to resume an adapter on a base other than the one it was trained on."""
    saved = meta.get("lora")
    if not self.cfg.on:
      if saved:
        raise ValueError(f"the checkpoint holds a LoRA adapter (rank {saved['rank']}); resume with --lora.rank "
                         f"{saved['rank']} or start a new run directory")
      return
    if not saved:
      raise ValueError("the checkpoint holds full weights, not a LoRA adapter; resume without --lora.rank or "
                       "start a new run directory")
    if saved["base_hash"] != self.base_hash:
      raise ValueError(f"the base model changed since this adapter was saved: it was trained on "
                       f"{saved['base_path'] or 'an in-memory model'} (sha256 {saved['base_hash'][:12]}), this run's "
                       f"base {self.cfg.base_path or 'in memory'} has sha256 {self.base_hash[:12]}; resume on the "
                       f"original base or start a new run directory")


def _mb(tree) -> str:
  return f"{sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**20:,.0f} MB"
