"""`train_rl`'s loop with a rollout worker (`async_rl.Scheduler`): used when RLConfig.max_lag > 0 or the mesh puts the
worker on devices of its own (MeshConfig.rollout_devices). The worker runs the collector on the newest params it has
been given while the trainer updates; each batch is trained at most max_lag versions late.

At max_lag = 0 the worker runs in lockstep and the run equals the synchronous loop's bitwise on the same devices
(tested): the worker draws the train state's key stream (the keys are derived ahead from the checkpointed key, as
`next_key` would), the source is asked and fed back in the same order, and no lag metric is logged.
Differences from the synchronous loop at max_lag = k > 0:
- The worker draws a step's problems from the source before the trainer has fed back the steps it is ahead of
  (`source.update` runs after each update, `source.batch` up to k steps earlier); both calls hold one lock.
- In the free schedule with a collector that takes a `versioned.Feed` (GroupCollector), new weights reach the
  generation in progress between decode steps (PipelineRL): rows carry tokens of several versions, each with its
  behaviour log-prob (old_logp) and version; a group's lag is its oldest token's.
- The loss's ratio uses the batch's old_logp, the sampler's per-token behaviour log-probs (TIS: they are the
  behaviour policy instead and the ratio is taken to this step's params; see objectives).
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
from exrl.rollout import versioned
from exrl.train import async_rl
from exrl.train.experience import device_batch, score
from exrl.train.state import next_key


def uses_worker(cfg) -> bool:
  """Whether `train_rl` runs this loop: a lag is allowed or the worker has devices of its own."""
  return cfg.max_lag > 0 or cfg.mesh.rollout_devices > 0


def rollout_placement(mesh_config: mesh_lib.MeshConfig):
  """(params -> the worker's copy). rollout_devices > 0: replicated on the rollout mesh (the last that many devices;
  device_put reshards from the train mesh); else a copy in place. A copy either way: the train step donates the
  state's buffers."""
  copy = lambda params: jax.tree.map(jnp.copy, params)
  if not mesh_config.rollout_devices:
    return copy
  if jax.process_count() > 1:
    raise ValueError(f"MeshConfig.rollout_devices={mesh_config.rollout_devices} splits one process's devices; "
                     f"multi-process runs share the global mesh (rollout_devices=0)")
  sharding = NamedSharding(mesh_lib.rollout_mesh(mesh_config), P())
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


def group_min_version(exp, version: int) -> np.ndarray:
  """Each group's oldest token's version: from the per-token tags (traces["version"], -1: no token) when the
  collector switched weights in flight, else the batch's one version."""
  num_groups = int(np.max(exp.rows["group_id"])) + 1
  tags = exp.traces.get("version")
  if tags is None:
    return np.full((num_groups,), version, np.int64)
  row_min_B = np.where(tags >= 0, tags, np.iinfo(np.int64).max).min(1)
  row_min_B = np.where(row_min_B == np.iinfo(np.int64).max, version, row_min_B)  # a row with no token
  out_G = np.full((num_groups,), np.iinfo(np.int64).max)
  np.minimum.at(out_G, exp.rows["group_id"][:len(row_min_B)], row_min_B)
  return out_G


def make_generate(cfg, collector, source, prompts: int, worker_ref, start_key_data, locks):
  """The worker's `generate(step, version, params, box) -> ((problems, exp), min_version_G)` for `Scheduler`.

  Keys: the train state's stream (next_key's splits from `start_key_data`, the key at the first step), drawn in step
  order as the worker runs. In-flight switches: free schedule, max_lag > 0 and a collector that takes a Feed."""
  source_lock, pool_lock = locks
  inflight = (cfg.max_lag > 0 and cfg.async_schedule == "free" and cfg.inflight
              and getattr(collector, "takes_feed", False))
  if inflight and jax.process_count() > 1:
    raise ValueError("RLConfig.inflight switches weights between decode steps of one process's engine; under "
                     "multi-process JAX set --rl.no-inflight (new weights then reach the worker between batches)")
  chain = {"key": jax.random.wrap_key_data(np.asarray(start_key_data))}

  def generate(step, version, params, box):
    chain["key"], key = jax.random.split(chain["key"])  # as next_key: the worker runs the steps in order
    with source_lock:
      problems = source.batch(step, prompts)
    feed = versioned.Feed((version, params), box.latest, cfg.inflight_every) if inflight else params
    with pool_lock:
      exp = collector.collect(feed, worker_ref, problems, key)
    return (problems, exp), group_min_version(exp, version)

  return generate


def train_async(cfg, run, collector, adapter, ref_params, source, prompts: int, *, model_config, check_skips,
                end_step) -> None:
  """Steps [run.start, cfg.steps) of `train_rl` with a rollout worker (see the module docstring).
  end_step(step, metrics, timing, eval_lock): the synchronous loop's eval / log / checkpoint tail."""
  place = rollout_placement(cfg.mesh)
  publish = lambda params: place(adapter.policy(params))  # the worker samples these as they are
  locks = source_lock, pool_lock = threading.Lock(), threading.Lock()
  temperature = 1.0 if cfg.sampling.greedy else cfg.sampling.temperature
  worker_ref = place(ref_params) if cfg.mesh.rollout_devices else ref_params  # the collector scores it there
  generate = make_generate(cfg, collector, source, prompts, worker_ref, jax.device_get(run.state.key), locks)
  sched = async_rl.Scheduler(generate, max_lag=cfg.max_lag, start=run.start, steps=cfg.steps,
                             params=publish(run.state.params), schedule=cfg.async_schedule)
  try:
    for step in range(run.start, cfg.steps):
      t0 = time.time()
      rollout, wait_s = sched.next(step)
      run.state, _ = next_key(run.state)  # the worker drew this step's key from the same stream
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
      metrics = {**exp.metrics, **jax.device_get(train_metrics)}
      if cfg.max_lag:  # at k = 0 every lag is 0: the lines stay the synchronous loop's
        metrics.update({**lag, "async/dropped_groups": float(stale_G.sum()) if cfg.stale == "drop" else 0.0,
                        "async/rescored_groups": float(stale_G.sum()) if cfg.stale == "rescore" else 0.0})
      check_skips(cfg, metrics, run, step)
      sched.publish(step + 1, publish(run.state.params))
      t_update = time.time()
      step_s = t_update - t0
      # idle fractions depend on timing: logged with the timings, outside the deterministic metrics
      timing = {**exp.timing, "update_s": t_update - t_collect, "step_s": step_s, "wait_s": wait_s, **shape,
                "trainer_idle_frac": min(wait_s / max(step_s, 1e-9), 1.0),
                "generator_idle_frac": min(sched.take_generator_idle_s() / max(step_s, 1e-9), 1.0)}
      end_step(step, metrics, timing, eval_lock=pool_lock)  # rollouts in flight are not checkpointed
  except BaseException:
    sched.close(strict=False)  # the trainer's error is the one to report
    raise
  sched.close()
