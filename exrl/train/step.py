"""One jitted, sharded train step with micro-batching, gradient accumulation and non-finite skipping.

A batch is a dict of arrays with a leading micro-batch axis: every leaf is [M, Bm, ...]. Rows
(the Bm axis) are sharded over (data, fsdp). A loss function maps (params, frozen, microbatch) to
(loss, weight, metrics): the step minimises sum_m weight_m * loss_m / sum_m weight_m, so the
accumulated gradient equals the full-batch gradient for any aggregation whose normaliser is a
count (tokens, traces, groups).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from exrl.infra import mesh as mesh_lib
from exrl.train.state import TrainState

LossFn = Callable[[dict, dict | None, dict], tuple[jax.Array, jax.Array, dict]]


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(state: TrainState, batch: dict, frozen, *, loss_fn: LossFn,
               optimizer: optax.GradientTransformation) -> tuple[TrainState, dict]:
  """Un-jitted step body; `make_train_step` wraps it in jit with shardings and donation."""
  grad_fn = jax.value_and_grad(lambda p, mb: _scaled(loss_fn, p, frozen, mb), has_aux=True)

  def accumulate(carry, mb):
    grads, loss_sum, weight_sum, metric_sums = carry
    (loss, (weight, metrics)), g = grad_fn(state.params, mb)
    grads = jax.tree.map(lambda a, b: a + b * weight, grads, g)
    metric_sums = jax.tree.map(lambda a, b: a + b * weight, metric_sums, metrics)
    return (grads, loss_sum + loss * weight, weight_sum + weight, metric_sums), None

  first_mb = jax.tree.map(lambda x: x[0], batch)
  metrics_shape = jax.eval_shape(lambda: _scaled(loss_fn, state.params, frozen, first_mb)[1][1])
  zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
  init = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()), zeros(metrics_shape))
  (grads, loss_sum, weight_sum, metric_sums), _ = jax.lax.scan(accumulate, init, batch)
  denom = jnp.maximum(weight_sum, 1e-8)
  grads = jax.tree.map(lambda g: g / denom, grads)
  loss = loss_sum / denom

  finite = jnp.isfinite(loss) & _all_finite(grads)

  def update(args):
    grads, params, opt_state = args
    updates, new_opt = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_opt

  # A branch, not a select of (new, old): the update then runs in place in the donated buffers, where a
  # select keeps both copies alive (about one params-and-optimizer-sized temp less; see tests/train/test_step.py).
  new_params, new_opt = jax.lax.cond(finite, update, lambda args: args[1:], (grads, state.params, state.opt_state))
  new_state = state.replace(
      params=new_params, opt_state=new_opt, step=state.step + 1,
      skipped_in_row=jnp.where(finite, 0, state.skipped_in_row + 1),
      skipped_total=state.skipped_total + (~finite).astype(jnp.int32))
  metrics = {k: v / denom for k, v in metric_sums.items()}
  metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), skipped=(~finite).astype(jnp.float32),
                 skipped_in_row=new_state.skipped_in_row.astype(jnp.float32))
  return new_state, metrics


def _scaled(loss_fn, params, frozen, mb):
  loss, weight, metrics = loss_fn(params, frozen, mb)
  return loss, (weight, metrics)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh=None,
                    state_shardings=None, frozen_shardings=None):
  """jit the step. With a mesh, batch rows go over (data, fsdp) and the state keeps its shardings."""
  fn = lambda state, batch, frozen: train_step(state, batch, frozen, loss_fn=loss_fn, optimizer=optimizer)
  if mesh is None:
    return jax.jit(fn, donate_argnums=0)
  # The batch's sharding is left to the arrays themselves, placed by `shard_batch`.
  return jax.jit(fn, donate_argnums=0, in_shardings=(state_shardings, None, frozen_shardings),
                 out_shardings=(state_shardings, mesh_lib.replicated(mesh)))


def microbatch_sharding(mesh, ndim: int):
  """[M, Bm, ...]: rows (axis 1) over (data, fsdp)."""
  return NamedSharding(mesh, P(None, mesh_lib.BATCH_AXES, *([None] * (ndim - 2))))


def shard_batch(batch: dict, mesh) -> dict:
  """Place a host batch ([M, Bm, ...] numpy arrays) on the mesh, rows over (data, fsdp)."""
  if mesh is None:
    return jax.tree.map(jnp.asarray, batch)
  div = mesh_lib.batch_divisor(mesh)
  for name, x in batch.items():
    if x.shape[1] % div:
      raise ValueError(f"micro-batch rows {x.shape[1]} (field {name!r}) are not divisible by "
                       f"data*fsdp={div} of the mesh {dict(mesh.shape)}; choose a batch that is")
  return {k: jax.device_put(v, microbatch_sharding(mesh, v.ndim)) for k, v in batch.items()}
