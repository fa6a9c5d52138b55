"""Experiment trackers behind MetricsWriter: TensorBoard, Weights & Biases, MLflow.

`--rl.trackers tensorboard wandb mlflow` (and `--sft.trackers`) picks any of them; metrics.jsonl is always
written. Each tracker gets the run's config once, every logged step, and the final evaluation as a summary.
Only process 0 holds a MetricsWriter (trainer.open_run), so only process 0 logs.

wandb and mlflow are optional extras (`pip install -e ".[wandb]"`, `".[mlflow]"`) and are configured the way
those projects document, through their environment variables:
  wandb:  WANDB_PROJECT (default "exrl"), WANDB_ENTITY, WANDB_MODE=offline for no network.
  mlflow: MLFLOW_TRACKING_URI (default: mlflow's own), MLFLOW_EXPERIMENT_NAME (default "exrl").
The run is named after run_dir. A resumed run (resume_step set) continues the same wandb / mlflow run, whose
ids are kept in run_dir/trackers.json. Steps after the last checkpoint are logged again on resume: mlflow keeps
both copies (equal, since metrics are deterministic), wandb drops the repeats.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

TrackerName = Literal["tensorboard", "wandb", "mlflow"]
TRACKERS: tuple[str, ...] = ("tensorboard", "wandb", "mlflow")
IDS_FILE = "trackers.json"
_EXTRA = {"wandb": "wandb", "mlflow": "mlflow"}  # the pyproject extra that installs each package


class Tracker(Protocol):
  def log(self, step: int, scalars: Mapping[str, float]) -> None: ...
  def summary(self, step: int, scalars: Mapping[str, float]) -> None: ...
  def close(self) -> None: ...


def check_names(names: Sequence[str], field: str = "trackers") -> tuple[str, ...]:
  """Validates tracker names (no repeats); returns them as a tuple."""
  bad = [n for n in names if n not in TRACKERS]
  if bad:
    raise ValueError(f"{field}={tuple(names)}: unknown tracker(s) {bad}; valid: {TRACKERS}")
  if len(set(names)) != len(names):
    raise ValueError(f"{field}={tuple(names)} names a tracker twice")
  return tuple(names)


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
  """{'optim': {'lr': 1e-5}} -> {'optim.lr': '1e-05'}: the flat string params mlflow takes."""
  out: dict[str, str] = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten_config(value, f"{name}."))
    else:
      out[name] = json.dumps(value) if isinstance(value, (list, tuple, bool)) or value is None else str(value)
  return out


def _import(name: str):
  try:
    return __import__(name)
  except ImportError as e:
    raise ImportError(f"tracker {name!r} needs the {name} package: pip install -e \".[{_EXTRA[name]}]\"") from e


class _Ids:
  """run_dir/trackers.json: the wandb / mlflow run ids a resume continues."""

  def __init__(self, run_dir: Path):
    self.path = run_dir / IDS_FILE
    self.ids = json.loads(self.path.read_text()) if self.path.exists() else {}

  def set(self, name: str, value: str) -> None:
    self.ids[name] = value
    tmp = self.path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(self.ids, indent=2))
    os.replace(tmp, self.path)


class TensorBoardTracker:
  """Scalars under run_dir/tb; on resume `purge_step` hides the killed run's events after the resume step."""

  def __init__(self, run_dir: Path, resume_step: int | None):
    from tensorboardX import SummaryWriter  # lazy: only runs that log to TensorBoard import it

    purge = None if resume_step is None else int(resume_step) + 1
    # unique suffix: event files are named by the second, so a fast restart would clobber one
    self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge, flush_secs=10,
                             filename_suffix=f".{time.time_ns()}")

  def log(self, step: int, scalars: Mapping[str, float]) -> None:
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def summary(self, step: int, scalars: Mapping[str, float]) -> None:
    self.log(step, scalars)

  def close(self) -> None:
    self._tb.close()


class WandbTracker:
  """A wandb run in run_dir/wandb; config as the run's config, the final eval in its summary."""

  def __init__(self, run_dir: Path, resume_step: int | None, config: Mapping[str, Any]):
    wandb = _import("wandb")
    ids = _Ids(run_dir)
    run_id = ids.ids.get("wandb") if resume_step is not None else None
    if run_id is None:
      run_id = uuid.uuid4().hex[:12]  # wandb ids: letters and digits
      ids.set("wandb", run_id)
    self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "exrl"), name=run_dir.name, dir=str(run_dir),
                           id=run_id, resume="allow", config=dict(config), reinit="create_new")

  def log(self, step: int, scalars: Mapping[str, float]) -> None:
    self._run.log(dict(scalars), step=step)

  def summary(self, step: int, scalars: Mapping[str, float]) -> None:
    del step
    self._run.summary.update(dict(scalars))

  def close(self) -> None:
    self._run.finish()


class MlflowTracker:
  """An mlflow run (MlflowClient, no global active run); config as params, the final eval as metrics."""

  _BATCH = 100  # mlflow's limit on params / metrics per log_batch call

  def __init__(self, run_dir: Path, resume_step: int | None, config: Mapping[str, Any]):
    _import("mlflow")
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    self._metric = Metric
    self._client = MlflowClient()  # MLFLOW_TRACKING_URI, or mlflow's default store
    ids = _Ids(run_dir)
    run_id = ids.ids.get("mlflow") if resume_step is not None else None
    if run_id is None:
      name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "exrl")
      exp = self._client.get_experiment_by_name(name)
      exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(name)
      run_id = self._client.create_run(exp_id, run_name=run_dir.name).info.run_id
      ids.set("mlflow", run_id)
      params = [Param(k, v[:6000]) for k, v in flatten_config(config).items()]  # mlflow caps a value at 6000
      for i in range(0, len(params), self._BATCH):
        self._client.log_batch(run_id, params=params[i:i + self._BATCH])
    else:  # params are immutable in mlflow: a resume keeps the first config (config.json records changes)
      self._client.update_run(run_id, status="RUNNING")
    self.run_id = run_id

  def log(self, step: int, scalars: Mapping[str, float]) -> None:
    now = int(time.time() * 1000)
    metrics = [self._metric(k, float(v), now, step) for k, v in scalars.items()]
    for i in range(0, len(metrics), self._BATCH):
      self._client.log_batch(self.run_id, metrics=metrics[i:i + self._BATCH])

  def summary(self, step: int, scalars: Mapping[str, float]) -> None:
    self.log(step, scalars)

  def close(self) -> None:
    self._client.set_terminated(self.run_id)


def open_trackers(names: Sequence[str], run_dir: str | Path, *, resume_step: int | None = None,
                  config: Mapping[str, Any] | None = None) -> list[Tracker]:
  """One tracker per name, in order; if one fails to start, those already open are closed."""
  run_dir = Path(run_dir)
  config = dict(config or {})
  out: list[Tracker] = []
  try:
    for name in check_names(names):
      if name == "tensorboard":
        out.append(TensorBoardTracker(run_dir, resume_step))
      elif name == "wandb":
        out.append(WandbTracker(run_dir, resume_step, config))
      else:
        out.append(MlflowTracker(run_dir, resume_step, config))
  except BaseException:
    for tracker in out:
      tracker.close()
    raise
  return out
