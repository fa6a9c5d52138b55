"""Asynchronous RL with bounded staleness (PipelineRL, arXiv 2509.19128; ScaleRL's k <= 8, arXiv 2510.13786).

A rollout worker thread generates step s's batch while the trainer updates on earlier ones. Versions: the params
after v updates are version v; the trainer trains step s at version s. The worker may start batch s only once
version s - k exists (k = max_lag), so every token it samples is at most k versions old when trained on; the trainer
still checks each group's oldest token and drops or re-scores any staler group (a worker given newer params in flight
only makes tokens younger).

Two schedules:
- "free": the worker samples with the newest version it has been given (and a versioned generator may switch to a
  newer one between decode steps). Lags, and so results, depend on timing: not reproducible run to run.
- "deterministic": batch s is sampled with exactly version max(start, s - k), fixed in advance, so a run is
  reproducible whatever the timings (the box keeps the last k + 1 versions for it). Lag is k once warmed up.

Checkpoints hold the trainer's state only; rollouts in flight are discarded, and a resumed run restarts generation
from the checkpointed params (version `start`), so its first k steps have smaller lags than an uninterrupted run's.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from typing import Any, Callable, NamedTuple

import numpy as np

SCHEDULES = ("free", "deterministic")
STALE_POLICIES = ("drop", "rescore")


class WorkerError(RuntimeError):
  """The rollout worker failed; the message is one line naming the step and the original error."""


class ParamsBox:
  """The params versions the trainer has published, newest last; thread-safe. Keeps `keep` versions."""

  def __init__(self, keep: int):
    self._cond = threading.Condition()
    self._versions: collections.OrderedDict[int, Any] = collections.OrderedDict()
    self._keep = max(keep, 1)
    self.closed = False

  def publish(self, version: int, params) -> None:
    with self._cond:
      self._versions[version] = params
      while len(self._versions) > self._keep:
        self._versions.popitem(last=False)
      self._cond.notify_all()

  def latest(self) -> tuple[int, Any]:
    with self._cond:
      v = next(reversed(self._versions))
      return v, self._versions[v]

  def wait(self, version: int, exact: bool) -> tuple[int, Any] | None:
    """Block until `version` (or, unless exact, a newer one) is published; None once closed."""
    with self._cond:
      while not self.closed:
        if exact and version in self._versions:
          return version, self._versions[version]
        if not exact and self._versions and next(reversed(self._versions)) >= version:
          v = next(reversed(self._versions))
          return v, self._versions[v]
        self._cond.wait(0.05)
      return None

  def close(self) -> None:
    with self._cond:
      self.closed = True
      self._cond.notify_all()


class Rollout(NamedTuple):
  """What the worker hands the trainer: step, the payload, the version each group's oldest token was sampled with,
  and the version the batch started with."""
  step: int
  payload: Any
  min_version_G: np.ndarray
  start_version: int


class Scheduler:
  """Runs `generate(step, version, params, box) -> (payload, min_version_G)` in a worker thread for steps
  [start, steps), at most `max_lag` versions ahead of the trainer, and hands the batches over in order.

  The trainer calls `next(step)` (blocks until batch `step` is ready) and `publish(step + 1, params)` after each
  update. Idle time is measured on both sides: the trainer waiting in `next`, the worker waiting for a version.
  A worker error re-raises in `next` as a one-line `WorkerError`; `close()` stops the worker and joins it.
  """

  def __init__(self, generate: Callable, *, max_lag: int, start: int, steps: int, params, schedule: str = "free"):
    if max_lag < 0:
      raise ValueError(f"max_lag={max_lag} must be >= 0")
    if schedule not in SCHEDULES:
      raise ValueError(f"schedule={schedule!r} is unknown; valid: {SCHEDULES}")
    self.generate, self.max_lag, self.start, self.steps, self.schedule = generate, max_lag, start, steps, schedule
    self.box = ParamsBox(keep=max_lag + 1)
    self.box.publish(start, params)
    self._queue: queue.Queue = queue.Queue()
    self._lock = threading.Lock()
    self._gen_idle_s = 0.0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._work, name="exrl-rollout-worker", daemon=True)
    self._thread.start()

  def _work(self) -> None:
    step = self.start
    try:
      for step in range(self.start, self.steps):
        want = max(self.start, step - self.max_lag)
        t0 = time.perf_counter()
        got = self.box.wait(want, exact=self.schedule == "deterministic")
        with self._lock:
          self._gen_idle_s += time.perf_counter() - t0
        if got is None or self._stop.is_set():
          return
        version, params = got
        payload, min_version_G = self.generate(step, version, params, self.box)
        self._queue.put(Rollout(step, payload, np.asarray(min_version_G, np.int64), version))
    except BaseException as e:  # handed to the trainer, which raises it
      first = (str(e).strip().splitlines() or [""])[0]
      self._queue.put(WorkerError(f"rollout worker failed at step {step}: {type(e).__name__}: {first}"))

  def next(self, step: int) -> tuple[Rollout, float]:
    """Batch `step` and the seconds the trainer waited for it."""
    t0 = time.perf_counter()
    while True:
      try:
        item = self._queue.get(timeout=0.05)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          raise WorkerError(f"rollout worker exited before producing step {step}") from None
    if isinstance(item, WorkerError):
      raise item
    if item.step != step:
      raise WorkerError(f"rollout worker produced step {item.step}, the trainer expected {step}")
    return item, time.perf_counter() - t0

  def publish(self, version: int, params) -> None:
    self.box.publish(version, params)

  def take_generator_idle_s(self) -> float:
    """The worker's waiting time since the last call."""
    with self._lock:
      s, self._gen_idle_s = self._gen_idle_s, 0.0
    return s

  def close(self, timeout_s: float = 30.0, strict: bool = True) -> None:
    """Stop the worker and join it; strict: raise if it is still in a generate call after timeout_s (it is a daemon
    thread, so it cannot keep the process alive either way)."""
    self._stop.set()
    self.box.close()
    self._thread.join(timeout_s)
    if strict and self._thread.is_alive():
      raise WorkerError(f"rollout worker did not stop within {timeout_s} s (a generate call is still running)")


def lag_metrics(step: int, min_version_G: np.ndarray, max_lag: int) -> tuple[np.ndarray, dict[str, float]]:
  """(stale_G, metrics): each group's lag (step - its oldest token's version), a histogram over 0..max_lag (bins
  lag/hist_i: fraction of groups), mean and max; stale_G marks groups past max_lag."""
  lag_G = step - np.asarray(min_version_G, np.int64)
  if lag_G.size and lag_G.min() < 0:
    raise ValueError(f"step {step}: a group carries version {int(min_version_G.max())} from the future")
  metrics = {f"lag/hist_{i}": float(np.mean(lag_G == i)) for i in range(max_lag + 1)}
  metrics.update({"lag/mean": float(lag_G.mean()), "lag/max": float(lag_G.max()),
                  "lag/over_frac": float(np.mean(lag_G > max_lag))})
  return lag_G > max_lag, metrics
