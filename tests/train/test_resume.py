"""A run killed with SIGKILL (between steps, or mid-save) and resumed ends bitwise-identical to a straight run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from exrl.infra.metrics import deterministic_lines

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


def _env(cache):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=str(ROOT))
  env["XLA_FLAGS"] = ""  # one device, as a user would run it
  return env


def _start(run_dir, cache, source="task"):
  return subprocess.Popen([sys.executable, "-m", "tests.train.mini_rl", str(run_dir), str(STEPS), source], cwd=ROOT,
                          env=_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(proc):
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err.decode()[-3000:]


def _metrics_steps(run_dir):
  f = Path(run_dir) / "metrics.jsonl"
  if not f.exists():
    return 0
  return sum(1 for line in f.read_text().splitlines() if line.strip())


def _saving(run_dir):
  """True while orbax has an uncommitted (temporary) step directory."""
  ckpt = Path(run_dir) / "ckpt"
  return ckpt.exists() and any(".orbax-checkpoint-tmp" in p.name for p in ckpt.iterdir())


def _kill_when(proc, cond, timeout=300):
  t0 = time.time()
  while not cond():
    assert proc.poll() is None, "the run ended before the kill point"
    assert time.time() - t0 < timeout, "kill point never reached"
    time.sleep(0.005)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  run = tmp_path_factory.mktemp("straight")
  _finish(_start(run, cache))
  return run, cache


def _assert_same(run, ref):
  a, b = np.load(run / "final_params.npz"), np.load(ref / "final_params.npz")
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bitwise
  assert deterministic_lines(run / "metrics.jsonl") == deterministic_lines(ref / "metrics.jsonl")
  assert len(deterministic_lines(run / "metrics.jsonl")) == STEPS


@pytest.mark.slow
@pytest.mark.parametrize("kill_point", ["after_step_3", "mid_save"])
def test_kill_and_resume_is_bitwise_identical(straight, kill_point, tmp_path):
  ref, cache = straight
  run = tmp_path / "run"
  proc = _start(run, cache)
  if kill_point == "after_step_3":
    _kill_when(proc, lambda: _metrics_steps(run) >= 3)
  else:  # the first save that is seen in flight after step 2
    _kill_when(proc, lambda: _metrics_steps(run) >= 2 and _saving(run))
  assert not (run / "final_params.npz").exists()
  _finish(_start(run, cache))
  _assert_same(run, ref)


def _draws(run):
  """Each step's drawn prompts; a killed run's draws past its checkpoint are re-drawn, the last one counts."""
  by_step = {}
  for line in (run / "draws.jsonl").read_text().splitlines():
    r = json.loads(line)
    by_step[r["step"]] = r["prompts"]
  return by_step


@pytest.mark.slow
def test_stateful_source_resumes_its_state(tmp_path_factory, tmp_path):
  """A source with state (failure counts, host RNG) killed and resumed draws exactly what a straight run draws."""
  cache = tmp_path_factory.mktemp("jax_cache_src")
  ref = tmp_path / "straight"
  _finish(_start(ref, cache, "hardest"))
  run = tmp_path / "run"
  proc = _start(run, cache, "hardest")
  _kill_when(proc, lambda: _metrics_steps(run) >= 3)
  _finish(_start(run, cache, "hardest"))
  assert _draws(run) == _draws(ref)
  assert len(_draws(ref)) == STEPS
  assert len({tuple(p) for p in _draws(ref).values()}) > 1  # the draws really depend on the state
  _assert_same(run, ref)
