"""Per-step metrics: JSONL (source of truth), TensorBoard event files, and a tqdm progress bar.

`run_dir/metrics.jsonl` holds one JSON object per line:

  {"step": 12,
   "metrics": {"reward/mean": 0.41, "acc": 0.5, "kl": 0.0012, ...},   # deterministic
   "timing":  {"time": 1718000000.1, "elapsed_s": 35.2, "tokens_per_s": 913.0, ...}}

* `step` and `metrics` are a pure function of the run's config and seed: a run killed and resumed
  from checkpoint step s ends with the same `(step, metrics)` lines as a straight run.
* `timing` is wall-clock dependent (unix time, seconds since writer start, throughput, step time)
  and is never compared. Anything the caller passes as `timing=` goes there.

Values are converted to python numbers on host (ints stay ints, floats become floats; NaN/inf are
written as JSON `NaN`/`Infinity`, which `json.loads` reads back). Call `write` after the jitted
step has returned, never inside jit.

The same scalars go to the chosen trackers (exrl.infra.trackers: TensorBoard under `run_dir/tb/`, wandb,
mlflow; tag = metric name, timing under `timing/`), which also get the config once and the final eval
(`summary`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tqdm

from exrl.infra.trackers import open_trackers

METRICS_FILE = "metrics.jsonl"
_ML_FLOATS = ("bfloat16", "float8_e4m3fn", "float8_e5m2")  # numpy kind "V", still floats


def to_scalar(name: str, value: Any) -> int | float:
  """jax / numpy / python scalar -> python int (integer and bool dtypes) or float."""
  arr = np.asarray(value)  # raises on jax tracers: metrics must be concrete (host side)
  if arr.size != 1:
    raise ValueError(f"metric {name!r} must be a scalar, got shape {arr.shape}")
  if arr.dtype.kind in "biu":
    return int(arr.reshape(()))
  if arr.dtype.kind == "f" or arr.dtype.name in _ML_FLOATS:
    return float(arr.reshape(()))
  raise TypeError(f"metric {name!r} must be numeric, got {type(value).__name__} {value!r}")


def flatten_scalars(tree: Mapping[str, Any], prefix: str = "") -> dict[str, int | float]:
  """{'reward': {'mean': x}} -> {'reward/mean': float(x)}; leaves converted with `to_scalar`."""
  out: dict[str, int | float] = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten_scalars(value, prefix=f"{name}/"))
    else:
      out[name] = to_scalar(name, value)
  return out


def read_jsonl(path: str | Path, *, deterministic: bool = False) -> list[dict]:
  """Parsed lines of a metrics file; a torn last line (no newline) is skipped.

  With `deterministic=True` each record keeps only `step` and `metrics`, the fields that must be
  identical between a straight run and a killed-and-resumed one.
  """
  records = []
  with open(path, "rb") as f:
    for raw in f:
      if not raw.endswith(b"\n"):
        break  # partial write of a killed run
      record = json.loads(raw)
      if deterministic:
        record = {"step": record["step"], "metrics": record["metrics"]}
      records.append(record)
  return records


def deterministic_lines(path: str | Path) -> list[str]:
  """Canonical JSON of each record's `step` + `metrics`: compare these between a straight and a
  resumed run (strings, so NaN metrics compare equal, unlike parsed floats)."""
  return [json.dumps(r, sort_keys=True) for r in read_jsonl(path, deterministic=True)]


def _fsync_dir(directory: Path) -> None:
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _truncate_to_step(path: Path, resume_step: int) -> None:
  """Atomically rewrites `path` keeping complete lines with step <= resume_step."""
  if not path.exists():
    return
  kept = [r for r in read_jsonl(path) if r["step"] <= resume_step]
  tmp = path.with_suffix(".jsonl.tmp")
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)  # a kill here leaves either the old or the new file, never a mix
  _fsync_dir(path.parent)


class MetricsWriter:
  """Appends per-step scalars to `run_dir/metrics.jsonl` (fsynced) and TensorBoard.

  Args:
    run_dir: run directory (created if missing).
    resume_step: the checkpoint step the run resumes from. Lines with step > resume_step (written
      by the killed run after its last checkpoint) are dropped. None starts a fresh log: an
      existing metrics.jsonl is moved aside to metrics.jsonl.prev.
    tensorboard: also write TensorBoard event files under `run_dir/tb` (when `trackers` is None).
    trackers: names from exrl.infra.trackers.TRACKERS; None means ("tensorboard",) or (), per `tensorboard`.
    config: the run's config as JSON, given to the trackers (wandb config, mlflow params).
  """

  def __init__(self, run_dir: str | Path, *, resume_step: int | None = None,
               tensorboard: bool = True, trackers: Sequence[str] | None = None,
               config: Mapping[str, Any] | None = None):
    self.run_dir = Path(run_dir)
    self.run_dir.mkdir(parents=True, exist_ok=True)
    self.path = self.run_dir / METRICS_FILE
    if resume_step is None:
      if self.path.exists():
        os.replace(self.path, self.path.with_suffix(".jsonl.prev"))
      self.last_step: int | None = None
    else:
      if resume_step < 0:
        raise ValueError(f"resume_step={resume_step} must be >= 0 or None (fresh run)")
      _truncate_to_step(self.path, int(resume_step))
      self.last_step = int(resume_step)
    self._file = open(self.path, "a")
    self._start = time.time()
    if trackers is None:
      trackers = ("tensorboard",) if tensorboard else ()
    try:
      self._trackers = open_trackers(trackers, self.run_dir, resume_step=resume_step, config=config)
    except BaseException:
      self._file.close()
      raise

  def write(self, step: int, metrics: Mapping[str, Any],
            timing: Mapping[str, Any] | None = None) -> dict:
    """Logs one record; returns it. `metrics` must be deterministic, `timing` wall-clock ones.

    Steps must not decrease (the same step may be logged twice, e.g. train then eval).
    """
    step = int(step)
    if self.last_step is not None and step < self.last_step:
      raise ValueError(f"step={step} is before the last logged step={self.last_step}")
    now = time.time()
    record = {
        "step": step,
        "metrics": flatten_scalars(metrics),
        "timing": {"time": now, "elapsed_s": now - self._start, **flatten_scalars(timing or {})},
    }
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())  # the line survives the process dying right after
    if self._trackers:
      scalars = {**record["metrics"],
                 **{f"timing/{k}": v for k, v in record["timing"].items() if k != "time"}}
      for tracker in self._trackers:
        tracker.log(step, scalars)
    self.last_step = step
    return record

  def summary(self, metrics: Mapping[str, Any]) -> dict:
    """The final evaluation to the trackers (at the last logged step); not a metrics.jsonl line. Non-numeric
    values are left out. Returns the scalars sent."""
    scalars = {}
    for name, value in metrics.items():
      try:
        scalars.update(flatten_scalars({name: value}))
      except (TypeError, ValueError):
        continue  # e.g. a list of per-problem samples
    for tracker in self._trackers:
      tracker.summary(self.last_step or 0, scalars)
    return scalars

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()
    trackers, self._trackers = self._trackers, []
    for tracker in trackers:
      tracker.close()

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _fmt(value: float) -> str:
  if isinstance(value, int):
    return str(value)
  if not math.isfinite(value):
    return str(value)
  return f"{value:.4g}"


class ProgressBar:
  """tqdm bar over train steps whose postfix shows selected metrics.

  `keys` is a sequence of metric names, or a mapping label -> metric name to show short labels
  (e.g. `{"reward": "reward/mean", "sc": "self_certainty"}`). Missing metrics are left out.
  """

  def __init__(self, total: int, keys: Sequence[str] | Mapping[str, str] = (
      "reward", "acc", "sc", "len"), *, initial: int = 0, **tqdm_kwargs: Any):
    self.keys = dict(keys) if isinstance(keys, Mapping) else {k: k for k in keys}
    tqdm_kwargs.setdefault("dynamic_ncols", True)
    self.bar = tqdm.tqdm(total=total, initial=initial, unit="step", **tqdm_kwargs)

  def update(self, step: int, metrics: Mapping[str, Any],
             timing: Mapping[str, Any] | None = None) -> str:
    """Moves the bar to `step` and shows the chosen metrics; returns the postfix string."""
    values = {**flatten_scalars(timing or {}), **flatten_scalars(metrics)}
    postfix = ", ".join(
        f"{label}={_fmt(values[name])}" for label, name in self.keys.items() if name in values
    )
    self.bar.n = int(step)
    self.bar.set_postfix_str(postfix, refresh=False)
    self.bar.refresh()
    return postfix

  def close(self) -> None:
    self.bar.close()

  def __enter__(self) -> ProgressBar:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
