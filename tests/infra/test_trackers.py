"""Trackers: wandb (offline) and mlflow (local file store) log a MetricsWriter run; the logged metrics, config
and final eval are read back from what each package wrote and compared with metrics.jsonl."""
import glob
import json
import struct
import time

import numpy as np
import pytest

from exrl.infra import trackers
from exrl.infra.metrics import MetricsWriter, read_jsonl

CONFIG = {"steps": 3, "optim": {"lr": 1e-5}, "trackers": ["wandb", "mlflow"], "remat": None}


def _log_run(run_dir, names, resume_step=None, steps=range(1, 4)):
  with MetricsWriter(run_dir, trackers=names, config=CONFIG, resume_step=resume_step) as writer:
    for step in steps:
      writer.write(step, {"reward": {"mean": 0.25 * step}, "acc": step % 2}, timing={"step_s": 0.5})
    return writer.summary({"eval/accuracy": 0.75, "eval/samples": [1, 0], "eval/name": "math"})


def test_check_names_rejects_unknown_and_repeats():
  assert trackers.check_names(["wandb", "tensorboard"]) == ("wandb", "tensorboard")
  with pytest.raises(ValueError, match="unknown tracker.*'neptune'.*valid"):
    trackers.check_names(["neptune"])
  with pytest.raises(ValueError, match="twice"):
    trackers.check_names(["wandb", "wandb"])


def test_flatten_config():
  assert trackers.flatten_config(CONFIG) == {"steps": "3", "optim.lr": "1e-05",
                                             "trackers": '["wandb", "mlflow"]', "remat": "null"}


def _wandb_records(path):
  """The records of a .wandb file: W&B's leveldb-log framing (7-byte header, 32 KiB blocks) of protobufs."""
  from wandb.proto import wandb_internal_pb2 as pb

  data = open(path, "rb").read()
  assert data[:4] == b":W&B"
  block, pos, buf = 32768, 7, b""
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block tail too short for a header is zero padding
      pos += block - pos % block
      continue
    _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if n == 0 and kind == 0:
      break
    buf += data[pos + 7:pos + 7 + n]
    pos += 7 + n
    if kind in (1, 4):  # FULL or LAST fragment
      record = pb.Record()
      record.ParseFromString(buf)
      buf = b""
      yield record


def _wandb_logged(run_dir):
  """(history by step, config, summary) of the offline wandb run whose id run_dir/trackers.json holds."""
  run_id = json.loads((run_dir / trackers.IDS_FILE).read_text())["wandb"]
  (path,) = glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
  history, config, summary = {}, {}, {}
  for record in _wandb_records(path):
    kind = record.WhichOneof("record_type")
    if kind == "history":
      row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
      history[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
    elif kind == "run":
      config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    elif kind == "summary":
      summary.update({item.key: json.loads(item.value_json) for item in record.summary.update if item.key})
  return history, config, summary


def test_wandb_offline_logs_metrics_config_and_summary(tmp_path, monkeypatch):
  pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install -e '.[wandb]')")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.setenv("WANDB_DIR", str(tmp_path))
  sent = _log_run(tmp_path, ["wandb"])
  assert sent == {"eval/accuracy": 0.75}  # lists and strings are left out
  lines = read_jsonl(tmp_path / "metrics.jsonl")
  history, config, summary = _wandb_logged(tmp_path)
  deadline = time.monotonic() + 60  # a CI run under load once read the file before wandb's writer had step 1 in it
  while not {line["step"] for line in lines} <= history.keys() and time.monotonic() < deadline:
    time.sleep(1)
    history, config, summary = _wandb_logged(tmp_path)
  assert {line["step"] for line in lines} <= history.keys(), f"wandb history has steps {sorted(history)}"
  for line in lines:
    logged = history[line["step"]]
    assert {k: logged[k] for k in line["metrics"]} == line["metrics"]
    assert logged["timing/step_s"] == 0.5
  assert config["optim"] == {"lr": 1e-5} and config["steps"] == 3
  assert summary["eval/accuracy"] == 0.75


def test_mlflow_file_store_logs_metrics_params_and_resumes(tmp_path, monkeypatch):
  pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install -e '.[mlflow]')")
  from mlflow.tracking import MlflowClient

  uri = f"file:{tmp_path / 'mlruns'}"
  monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
  monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store behind this switch
  monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "exrl-test")
  run_dir = tmp_path / "run"
  _log_run(run_dir, ["mlflow", "tensorboard"])
  run_id = json.loads((run_dir / trackers.IDS_FILE).read_text())["mlflow"]
  client = MlflowClient(uri)
  run = client.get_run(run_id)
  assert run.info.run_name == "run" and run.info.status == "FINISHED"
  assert run.data.params["optim.lr"] == "1e-05" and run.data.params["trackers"] == '["wandb", "mlflow"]'
  history = {(m.step, m.value) for m in client.get_metric_history(run_id, "reward/mean")}
  assert history == {(r["step"], r["metrics"]["reward/mean"]) for r in read_jsonl(run_dir / "metrics.jsonl")}
  assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/accuracy")] == [(3, 0.75)]

  # a resume from step 2 continues the same mlflow run (the ids file), and logs steps 3..4
  _log_run(run_dir, ["mlflow"], resume_step=2, steps=range(3, 5))
  assert json.loads((run_dir / trackers.IDS_FILE).read_text())["mlflow"] == run_id
  steps = sorted(m.step for m in client.get_metric_history(run_id, "acc"))
  assert steps == [1, 2, 3, 3, 4]  # step 3 twice: logged before the kill and again after the resume
  assert client.get_experiment(run.info.experiment_id).name == "exrl-test"
  assert len(client.search_runs([run.info.experiment_id])) == 1


def test_missing_package_names_the_extra(tmp_path, monkeypatch):
  import builtins

  real_import = builtins.__import__

  def no_wandb(name, *args, **kwargs):
    if name == "wandb":
      raise ImportError("No module named 'wandb'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_wandb)
  with pytest.raises(ImportError, match=r"pip install -e \"\.\[wandb\]\""):
    MetricsWriter(tmp_path, trackers=["wandb"])
  assert (tmp_path / "metrics.jsonl").exists()  # the writer's file was closed, not leaked open


def test_train_rl_logs_to_wandb_and_mlflow(tmp_path, monkeypatch):
  """A tiny train_rl run with --rl.trackers wandb mlflow: each holds every step of metrics.jsonl, the config,
  and the final eval of eval.json."""
  pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install -e '.[wandb]')")
  pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install -e '.[mlflow]')")
  from mlflow.tracking import MlflowClient

  from tests.train import mini_rl

  uri = f"file:{tmp_path / 'mlruns'}"
  for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                     "MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
    monkeypatch.setenv(key, value)
  run_dir = tmp_path / "run"
  _, final_eval = mini_rl.run(str(run_dir), steps=2, eval_n=4, trackers=("wandb", "mlflow"))
  lines = read_jsonl(run_dir / "metrics.jsonl")
  assert [r["step"] for r in lines] == [1, 2] and not (run_dir / "tb").exists()  # tensorboard not asked for
  evals = {f"eval/{k}": v for k, v in final_eval.items() if isinstance(v, (int, float))}
  assert evals and json.loads((run_dir / "eval.json").read_text())["n"] == 4

  history, config, summary = _wandb_logged(run_dir)
  assert {s: {k: history[s][k] for k in line["metrics"]} for s, line in ((r["step"], r) for r in lines)} == {
      r["step"]: r["metrics"] for r in lines}
  assert config["steps"] == 2 and config["trackers"] == ["wandb", "mlflow"] and config["group_size"] == 4
  assert {k: summary[k] for k in evals} == pytest.approx(evals)

  client = MlflowClient(uri)
  run = client.get_run(json.loads((run_dir / trackers.IDS_FILE).read_text())["mlflow"])
  assert run.data.params["steps"] == "2" and run.data.params["sampling.max_new_tokens"] == "4"
  for name in lines[0]["metrics"]:
    got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
    want = [(r["step"], r["metrics"][name]) for r in lines]
    np.testing.assert_allclose(np.asarray(got, float), np.asarray(want, float), rtol=1e-6, err_msg=name)
  assert {k: run.data.metrics[k] for k in evals} == pytest.approx(evals)
