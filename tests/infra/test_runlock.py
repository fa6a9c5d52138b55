"""One live run per run directory: a double launch exits 2 naming the holder; a killed holder frees the lock."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from exrl import cli
from exrl.infra import runlock
from exrl.infra.metrics import deterministic_lines

ROOT = Path(__file__).resolve().parents[2]
HOLDER = """
import sys, time
from exrl.infra import runlock
with runlock.hold(sys.argv[1]):
  print("held", flush=True)
  time.sleep(600)
"""


def _hold_in_child(run_dir, env=None):
  """A child process that holds `run_dir`'s lock until killed (it prints 'held' once it has it)."""
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})))
  assert proc.stdout.readline().strip() == b"held"
  return proc


def _kill(proc):
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()


def test_second_holder_is_refused_naming_host_pid_start_and_sigkill_frees_it(tmp_path):
  run_dir = tmp_path / "run"
  proc = _hold_in_child(run_dir)
  try:
    with pytest.raises(runlock.RunLockedError) as e:
      with runlock.hold(run_dir):
        pass
    msg = cli.user_error_message(e.value)
    info = json.loads((run_dir / runlock.LOCK_NAME).read_text())
    assert info["pid"] == proc.pid and "\n" not in msg
    assert f"PID {proc.pid}" in msg and f"host {info['host']}" in msg and f"started {info['started']}" in msg
    assert str(run_dir) in msg
  finally:
    _kill(proc)  # SIGKILL: no cleanup code runs; the kernel drops the lock with the process
  with runlock.hold(run_dir):
    assert json.loads((run_dir / runlock.LOCK_NAME).read_text())["pid"] == os.getpid()


def test_holds_nest_in_one_process_and_release_at_the_outermost(tmp_path):
  with runlock.hold(tmp_path):
    with runlock.hold(f"{tmp_path}/sub/.."):  # the same directory, spelled differently
      pass
    probe = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT, capture_output=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert probe.returncode == 1 and b"RunLockedError" in probe.stderr  # still held after the inner exit
  _kill(_hold_in_child(tmp_path))  # released after the outer exit


def test_object_store_dirs_lock_a_local_stand_in(tmp_path, monkeypatch):
  """gs:// has no locks: two launches on one machine still exclude each other through a local file."""
  monkeypatch.setenv("EXRL_CACHE_DIR", str(tmp_path))
  url = "gs://bucket/runs/a"
  assert runlock.lock_path(url).parent == tmp_path / "locks"
  assert runlock.lock_path(url) == runlock.lock_path(url + "/") != runlock.lock_path("gs://bucket/runs/b")
  proc = _hold_in_child(url, env={"EXRL_CACHE_DIR": str(tmp_path)})
  try:
    with pytest.raises(runlock.RunLockedError, match=f"PID {proc.pid}"):
      with runlock.hold(url):
        pass
    with runlock.hold("gs://bucket/runs/b"):
      pass
  finally:
    _kill(proc)


# ---- the scenario: experiments.grpo launched twice on one run directory ---------------------------------

def _grpo_cmd(model_dir, data, run_dir):
  return [sys.executable, "-m", "experiments.grpo", "--model", str(model_dir), "--data", str(data),
          "--question-field", "q", "--answer-field", "a", "--eval-problems", "0", "--rl.run-dir", str(run_dir),
          "--rl.steps", "3", "--rl.prompts-per-step", "2", "--rl.group-size", "2", "--rl.checkpoint-every", "1",
          "--rl.sampling.max-new-tokens", "4", "--export-dtype", "float32"]


def _env(cache):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", TOKENIZERS_PARALLELISM="false")
  env["XLA_FLAGS"] = ""  # one device, as a user would run it
  return env


def _snapshot(run_dir):
  """Every file under run_dir (but the lock's holder note) with its bytes and mtime."""
  return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*"))
          if p.is_file() and p.name != runlock.LOCK_NAME}


def _checkpoints(run_dir):
  """{step: (state arrays by path, meta)} restored from every checkpoint of the run."""
  import jax

  from exrl.infra.checkpoint import Checkpointer

  out = {}
  with Checkpointer(run_dir / "ckpt") as ckpt:
    for step in ckpt.all_steps():
      state, meta = ckpt.restore(step)
      out[step] = ({jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(state)[0]},
                   meta)
  return out


@pytest.fixture(scope="module")
def grpo_inputs(tmp_path_factory):
  from tests.models.hf_fixtures import make_hf_model
  from tests.test_tokenizer import CHAT_TEMPLATE, _save_hf_tokenizer

  root = tmp_path_factory.mktemp("grpo_inputs")
  _save_hf_tokenizer(root / "model", chat_template=CHAT_TEMPLATE)
  make_hf_model("qwen2", root / "model", vocab_size=384)
  rng = np.random.default_rng(0)
  with open(root / "train.jsonl", "w") as f:
    for _ in range(12):
      a, b = rng.integers(0, 50, 2)
      f.write(json.dumps({"q": f"What is {a}+{b}?", "a": f"#### {a + b}"}) + "\n")
  return root / "model", root / "train.jsonl", tmp_path_factory.mktemp("jax_cache")


def _wait_for_lock(proc, run_dir, timeout=120):
  t0, lock = time.time(), run_dir / runlock.LOCK_NAME
  while not lock.is_file() or f'"pid": {proc.pid}' not in lock.read_text():
    assert proc.poll() is None and time.time() - t0 < timeout, "the first launch never took the lock"
    time.sleep(0.01)


@pytest.mark.slow
def test_double_launch_exits_2_naming_the_holder_and_leaves_the_first_run_intact(grpo_inputs, tmp_path):
  """The issue's trial: the same experiments.grpo command launched twice on one run directory.

  The first launch is frozen (SIGSTOP) while it holds the lock, so the run directory before and after the refused
  launch must be byte-for-byte and mtime-for-mtime the same: the refusal wrote nothing, and the first run then goes
  on from exactly the state it was in (a side-by-side reference run would only re-prove that determinism, which
  tests/train/test_resume.py covers).
  """
  model_dir, data, cache = grpo_inputs
  run = tmp_path / "run"
  first = subprocess.Popen(_grpo_cmd(model_dir, data, run), cwd=ROOT, env=_env(cache), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
  try:
    _wait_for_lock(first, run)
    os.kill(first.pid, signal.SIGSTOP)  # frozen while holding the lock: any write by the second would show
    before = _snapshot(run)
    t0 = time.time()
    second = subprocess.run(_grpo_cmd(model_dir, data, run), cwd=ROOT, env=_env(cache), capture_output=True,
                            timeout=120)
    second_s = time.time() - t0
    assert _snapshot(run) == before  # the refused launch wrote nothing at all
  finally:
    os.kill(first.pid, signal.SIGCONT)
  err = second.stderr.decode().strip()
  assert second.returncode == cli.EXIT_USER_ERROR and len(err.splitlines()) == 1, err[-3000:]
  assert err.startswith(f"error: run directory {run} is in use by host ") and f"PID {first.pid}," in err
  assert second_s < 60, f"the refusal took {second_s:.1f} s"
  _, out = first.communicate(timeout=600)
  assert first.returncode == 0, out.decode()[-3000:]
  assert len(deterministic_lines(run / "metrics.jsonl")) == 3
  assert sorted(_checkpoints(run)) == [2, 3]
  with runlock.hold(run):  # the finished run let go of its lock
    pass
