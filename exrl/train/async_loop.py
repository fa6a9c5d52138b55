"""`train_rl`'s loop when RLConfig.max_lag > 0: a rollout worker (`async_rl.Scheduler`) runs the collector on the
newest params it has been given while the trainer updates; each batch is trained at most max_lag versions late.

Differences from the synchronous loop (max_lag = 0, which never comes here):
- The worker's PRNG key for step s is fold_in(key(seed), s), not drawn from the train state, so it does not depend
  on when the worker runs.
- The worker draws a step's problems from the source before the trainer has fed back the steps it is ahead of
  (`source.update` runs after each update, `source.batch` up to k steps earlier); both calls hold one lock.
- With one inner epoch the loss's ratio uses the batch's old_logp, the sampler's per-token behaviour log-probs
  (TIS: they are the behaviour policy instead and the ratio is taken to this step's params; see objectives).
- A group staler than max_lag (possible only when a worker outruns its gate, e.g. a custom schedule) is dropped
  (loss mask zeroed: shapes stay fixed) or re-scored (old_logp recomputed with the trainer's params), and counted.
- Evaluation holds the verifier-pool lock, so the worker's verification waits for it.
"""
from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from exrl.infra import mesh as mesh_lib
from exrl.train import async_rl
from exrl.train.experience import device_batch, score


def rollout_placement(cfg):
  """(params -> the worker's copy). rollout_devices > 0: replicated on the last that many devices (device_put);
  else a copy on the train mesh. A copy either way: the train step donates the state's buffers."""
  n = cfg.rollout_devices
  if n and not 0 < n < len(jax.devices()):
    raise ValueError(f"RLConfig.rollout_devices={n} must be in [1, {len(jax.devices()) - 1}] with "
                     f"{len(jax.devices())} devices (0: the worker shares the train mesh)")
  copy = lambda params: jax.tree.map(jnp.copy, params)
  if not n:
    return copy
  sharding = NamedSharding(mesh_lib.make_mesh(mesh_lib.MeshConfig(), jax.devices()[-n:]), P())
  return lambda params: jax.device_put(copy(params), sharding)


def handle_stale(rows: dict, stale_G: np.ndarray, policy: str, rescore) -> dict:
  """The rows with stale groups dropped (loss mask zeroed: shapes stay fixed) or re-scored (old_logp from
  rescore(rows) -> float[B, S], the trainer's current policy)."""
  if policy not in async_rl.STALE_POLICIES:
    raise ValueError(f"stale={policy!r} is unknown; valid: {async_rl.STALE_POLICIES}")
  stale_B = np.asarray(stale_G)[rows["group_id"]]
  if not stale_B.any():
    return rows
  if policy == "drop":
    return {**rows, "loss_mask": rows["loss_mask"] * ~stale_B[:, None]}
  return {**rows, "old_logp": np.where(stale_B[:, None], rescore(rows), rows["old_logp"])}


def train_async(cfg, run, collector, adapter, ref_params, source, prompts: int, *, model_config, run_eval,
                on_eval, eval_problems, check_skips, save_meta) -> None:
  """Steps [run.start, cfg.steps) of `train_rl` with generation overlapping the updates (see the module docstring)."""
  place = rollout_placement(cfg)
  source_lock, pool_lock = threading.Lock(), threading.Lock()
  base_key = jax.random.key(cfg.seed)
  temperature = 1.0 if cfg.sampling.greedy else cfg.sampling.temperature
  worker_ref = place(ref_params) if cfg.rollout_devices else ref_params  # the collector scores it with the policy

  def generate(step, version, params, box):
    del box  # the collector samples a whole batch with one version; no in-flight switch on this path
    with source_lock:
      problems = source.batch(step, prompts)
    with pool_lock:
      exp = collector.collect(adapter.policy(params), worker_ref, problems, jax.random.fold_in(base_key, step))
    num_groups = int(np.max(exp.rows["group_id"])) + 1
    return (problems, exp), np.full((num_groups,), version)

  sched = async_rl.Scheduler(generate, max_lag=cfg.max_lag, start=run.start, steps=cfg.steps,
                             params=place(run.state.params), schedule=cfg.async_schedule)
  try:
    for step in range(run.start, cfg.steps):
      t0 = time.time()
      rollout, wait_s = sched.next(step)
      problems, exp = rollout.payload
      stale_G, lag = async_rl.lag_metrics(step, rollout.min_version_G, cfg.max_lag)
      rescore = lambda rows: jax.device_get(score(
          model_config, adapter.policy(run.state.params), None, rows["tokens"], rows["valid"], rows["positions"],
          rows["loss_mask"], with_ref=False, temperature=temperature)["logp"])
      rows = handle_stale(exp.rows, stale_G, cfg.stale, rescore)
      t_collect = time.time()
      batch, shape = device_batch(rows, cfg.num_microbatches, cfg.pack_width, run.mesh)
      for _ in range(cfg.inner_epochs):
        run.state, train_metrics = run.step_fn(run.state, batch, ref_params)
      with source_lock:
        source.update(problems, exp)
      metrics = {**exp.metrics, **jax.device_get(train_metrics), **lag,
                 "async/dropped_groups": float(stale_G.sum()) if cfg.stale == "drop" else 0.0,
                 "async/rescored_groups": float(stale_G.sum()) if cfg.stale == "rescore" else 0.0}
      check_skips(cfg, metrics, run, step)
      sched.publish(step + 1, place(run.state.params))
      t_update = time.time()
      step_s = t_update - t0
      # idle fractions depend on timing: logged with the timings, outside the deterministic metrics
      timing = {**exp.timing, "update_s": t_update - t_collect, "step_s": step_s, "wait_s": wait_s, **shape,
                "trainer_idle_frac": min(wait_s / max(step_s, 1e-9), 1.0),
                "generator_idle_frac": min(sched.take_generator_idle_s() / max(step_s, 1e-9), 1.0)}
      if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps and eval_problems:
        with pool_lock:
          ev = run_eval(run.state.params)
        metrics.update({f"eval/{k}": v for k, v in ev.items() if isinstance(v, float)})
        if on_eval:
          on_eval(step + 1, ev)
      run.writer.write(step + 1, metrics, timing)
      run.bar.update(step + 1, metrics)
      if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
        run.save(step + 1, save_meta())  # the trainer's state only: rollouts in flight are not saved
  except BaseException:
    sched.close(strict=False)  # the trainer's error is the one to report
    raise
  sched.close()
