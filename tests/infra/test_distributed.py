"""Multi-host set-up: flag resolution and fail-fast errors, and real 2-process gloo runs on 127.0.0.1.

The 2-process tests start this file as a worker (`python -m tests.infra.test_distributed MODE ...`), each process
with 2 forced CPU devices, and compare against an in-process run on 4 of the 8 test devices (the oracle).
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(mode, n, port, out, extra=(), env_extra=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "PYTHONPATH": str(ROOT), **(env_extra or {})}
  return [subprocess.Popen([sys.executable, "-m", "tests.infra.test_distributed", mode, str(i), str(n), str(port),
                            str(out), *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True) for i in range(n)]


def _wait(procs, timeout):
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise AssertionError(f"worker hung past {timeout} s")
  return [p.returncode for p in procs], outs


# ---------------------------------------------------------------- flags and fail-fast errors (no subprocess)

def test_resolve_sources():
  from exrl.infra import distributed as d
  assert d.resolve(d.DistributedConfig(), env={}).source == "single"
  r = d.resolve(d.DistributedConfig(coordinator="h:1", num_processes=4, process_id=3), env={})
  assert (r.coordinator, r.num_processes, r.process_id, r.source) == ("h:1", 4, 3, "flags")
  r = d.resolve(d.DistributedConfig(), env={"EXRL_COORDINATOR": "10.0.0.1:99", "EXRL_NUM_PROCESSES": "2",
                                            "EXRL_PROCESS_ID": "1"})
  assert (r.coordinator, r.num_processes, r.process_id, r.source) == ("10.0.0.1:99", 2, 1, "env")
  r = d.resolve(d.DistributedConfig(), env={"SLURM_NTASKS": "8", "SLURM_PROCID": "5",
                                            "SLURM_JOB_NODELIST": "gpu[07-10,12],cpu1"})
  assert (r.coordinator, r.num_processes, r.process_id, r.source) == ("gpu07:12345", 8, 5, "slurm")
  assert d.resolve(d.DistributedConfig(), env={"TPU_WORKER_HOSTNAMES": "a,b"}).source == "tpu"


@pytest.mark.parametrize("cfg, message", [
    (dict(coordinator="h:1", num_processes=2, process_id=2), "process_id=2 is out of range for num_processes=2"),
    (dict(coordinator="h:1", num_processes=2, process_id=-1), "valid ids are 0..1"),
    (dict(coordinator="h:1", num_processes=0, process_id=0), "num_processes=0 must be >= 1"),
    (dict(coordinator="nohostport", num_processes=2, process_id=0), "must be host:port"),
    (dict(coordinator="h:70000", num_processes=2, process_id=0), "must be host:port"),
    (dict(num_processes=2, process_id=0), "needs coordinator"),
])
def test_bad_flags_fail_fast(cfg, message):
  from exrl.infra import distributed as d
  t0 = time.monotonic()
  with pytest.raises(d.DistributedError, match=message):
    d.init(d.DistributedConfig(**cfg), env={})
  assert time.monotonic() - t0 < 1


def test_bad_env_names_the_variable():
  from exrl.infra import distributed as d
  with pytest.raises(d.DistributedError, match="EXRL_PROCESS_ID='x' is not an integer"):
    d.resolve(d.DistributedConfig(), env={"EXRL_COORDINATOR": "h:1", "EXRL_NUM_PROCESSES": "2",
                                          "EXRL_PROCESS_ID": "x"})


def test_unreachable_coordinator_is_a_bounded_wait():
  from exrl.infra import distributed as d
  t0 = time.monotonic()
  with pytest.raises(d.DistributedError, match=r"unreachable after 1 s"):
    d.init(d.DistributedConfig(coordinator=f"127.0.0.1:{_free_port()}", num_processes=2, process_id=1,
                               connect_timeout_s=1.0), env={})
  assert time.monotonic() - t0 < 5


def test_mesh_that_does_not_fill_the_devices():
  import jax
  from exrl.infra import distributed as d
  from exrl.infra.mesh import MeshConfig
  with pytest.raises(d.DistributedError, match=r"does not fill the 8 devices \(1 processes x 8 local\)"):
    d.global_mesh(MeshConfig(data=3, fsdp=1, tensor=2))
  with pytest.raises(d.DistributedError, match="fsdp=3"):
    d.global_mesh(MeshConfig(data=-1, fsdp=3))
  assert d.global_mesh(MeshConfig(data=-1, tensor=2)).shape["data"] == jax.device_count() // 2


def test_main_only_and_process_rows_single_process():
  from exrl.infra import distributed as d
  from exrl.infra.mesh import MeshConfig
  calls = []
  assert d.main_only(lambda x: calls.append(x) or 7)(3) == 7 and calls == [3]
  mesh = d.global_mesh(MeshConfig(data=-1, tensor=2))
  assert d.process_rows(16, mesh) == slice(0, 16)
  with pytest.raises(d.DistributedError, match="do not split"):
    d.process_rows(6, mesh)


# ---------------------------------------------------------------- two real processes

def _rows():
  """test_step's rows with the seam's global ids (one trace per row, groups of G)."""
  from tests.train import test_step as ts
  rows = ts._rows()
  B = rows["adv"].shape[0]
  return {**rows, "trace_id": np.arange(B, dtype=np.int32), "group_id": (np.arange(B) // ts.G).astype(np.int32)}


def _single_process_step():
  """The oracle: the same step on 4 in-process devices (mesh data=2, tensor=2), global batch fed directly."""
  import jax
  from exrl.infra import mesh as mesh_lib
  from exrl.train.experience import pack_microbatches
  from exrl.train.step import shard_batch
  from tests.train import test_step as ts
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(2, 1, 2), jax.devices()[:4])
  step, state, ref = _build_step(mesh)
  state, metrics = step(state, shard_batch(pack_microbatches(_rows(), 1, ts.G), mesh), ref)
  return jax.device_get(state.params), jax.device_get(metrics)


def _build_step(mesh):
  import jax
  from exrl.models import decoder
  from exrl.rl.losses import LossConfig
  from exrl.train.objectives import rl_loss_fn
  from exrl.train.state import OptimConfig, make_optimizer
  from exrl.train.step import make_train_step
  from exrl.train.trainer import setup_state
  from tests.train import test_step as ts
  params = jax.device_get(decoder.init_params(ts.CFG, jax.random.key(0)))
  opt = make_optimizer(OptimConfig(lr=1e-2, warmup_frac=0.0, eps=1e-4), 10)
  state, sh = setup_state(ts.CFG, params, opt, 0, mesh)
  ref = jax.device_put(jax.device_get(decoder.init_params(ts.CFG, jax.random.key(1))), sh.params)
  loss_cfg = LossConfig(kl_beta=0.1, aggregation="seq_mean_token_mean")
  return make_train_step(rl_loss_fn(ts.CFG, loss_cfg), opt, mesh, sh, sh.params), state, ref


def _worker_step(pid, n, port, out):
  """Each process feeds only its rows (make_array_from_process_local_data); process 0 writes the result."""
  from exrl.infra import distributed as d
  d.init(d.DistributedConfig(coordinator=f"127.0.0.1:{port}", num_processes=n, process_id=pid,
                             heartbeat_timeout_s=10))
  import jax
  from exrl.train.experience import pack_microbatches
  from exrl.infra.mesh import MeshConfig
  from tests.train import test_step as ts
  assert jax.process_count() == n and jax.local_device_count() == 2 and jax.device_count() == 2 * n
  mesh = d.global_mesh(MeshConfig(2, 1, 2))
  step, state, ref = _build_step(mesh)
  packed = pack_microbatches(_rows(), 1, ts.G)
  rows = d.process_rows(packed["tokens"].shape[1], mesh)
  assert rows.stop - rows.start == packed["tokens"].shape[1] // n
  state, metrics = step(state, d.global_batch({k: v[:, rows] for k, v in packed.items()}, mesh), ref)
  params, metrics = d.to_host(state.params), d.to_host(metrics)
  d.main_only(_save)(out, params, metrics, rows)


def _save(out, params, metrics, rows):
  import jax
  flat = {"/".join(str(k.key) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(params)}
  np.savez(out, **flat, **{f"metric:{k}": np.asarray(v) for k, v in metrics.items()})
  Path(str(out) + ".json").write_text(json.dumps({"rows": [rows.start, rows.stop]}))


def _worker_dies(pid, n, port, out):
  """Process 1 dies hard after start-up; process 0 waits in a collective and must be ended by the heartbeat."""
  from exrl.infra import distributed as d
  d.init(d.DistributedConfig(coordinator=f"127.0.0.1:{port}", num_processes=n, process_id=pid,
                             heartbeat_timeout_s=3))
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices("up")
  if pid == 1:
    os._exit(17)
  Path(out).write_text("waiting")
  for i in range(600):
    multihost_utils.sync_global_devices(f"tick{i}")
    time.sleep(0.1)
  Path(out).write_text("never noticed")


def test_two_processes_step_equals_single_process(tmp_path):
  out = tmp_path / "res.npz"
  # The oracle first: run alongside the two processes on 2 cores, its in-process collectives can starve past
  # XLA's rendezvous time-out, which aborts the test process (seen once).
  want_params, want = _single_process_step()
  procs = _spawn("step", 2, _free_port(), out)
  codes, logs = _wait(procs, timeout=240)
  assert codes == [0, 0], "\n".join(logs)
  got = np.load(out)
  import jax
  flat_want = {"/".join(str(k.key) for k in p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(want_params)}
  assert set(flat_want) <= set(got.files)
  chex.assert_trees_all_close({k: got[k] for k in flat_want}, flat_want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got["metric:loss"], want["loss"], rtol=1e-5, atol=1e-6)
  assert json.loads(Path(str(out) + ".json").read_text())["rows"] == [0, 8]  # process 0 fed half the rows


def test_dead_process_ends_the_others_with_an_error(tmp_path):
  out = tmp_path / "state.txt"
  t0 = time.monotonic()
  procs = _spawn("dies", 2, _free_port(), out)
  codes, logs = _wait(procs, timeout=120)
  assert codes[1] == 17
  assert codes[0] != 0, logs[0][-2000:]  # not a silent success, not a hang
  assert out.read_text() == "waiting"
  assert time.monotonic() - t0 < 120


def _worker_rl(pid, n, port, run_dir, steps):
  """The real RL loop (sampling, verifying, advantages, the step, checkpoints) on a global data=2 x tensor=2 mesh."""
  from exrl.infra import distributed as d
  if n > 1:
    d.init(d.DistributedConfig(coordinator=f"127.0.0.1:{port}", num_processes=n, process_id=pid,
                               heartbeat_timeout_s=10))
  from exrl.infra.mesh import MeshConfig
  from tests.train import mini_rl
  state, _ = mini_rl.run(run_dir, int(steps), mesh=MeshConfig(2, 1, 2), verify=mini_rl.starts_with_one)
  params = d.to_host(state.params)
  d.main_only(np.savez)(Path(run_dir) / "final_params.npz", **_flat(params))


def _flat(params):
  import jax
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _deterministic(run_dir):
  from exrl.infra.metrics import read_jsonl
  return read_jsonl(Path(run_dir) / "metrics.jsonl", deterministic=True)


@pytest.mark.slow
def test_two_process_rl_loop_equals_single_process_and_resumes_after_a_kill(tmp_path):
  """2 processes x 2 devices through train_rl, each building only its own rows (its source yields its half of the
  prompts; the global batch is formed with make_array_from_process_local_data), one SIGKILLed mid-run, both
  restarted: the resumed run ends with the metrics and final params of an uninterrupted single-process run on 4
  devices. Metrics from host values (rewards, accuracy, lengths) are identical; those from device arithmetic (token
  statistics, loss, grad norm) equal to rounding: the sharded programs differ, and the processes pack their own rows
  into bins where one process packs them all together."""
  from experiments import common
  from exrl.tasks import get_task
  steps = 4
  one, two = tmp_path / "one", tmp_path / "two"
  for run_dir in (one, two):  # both processes share run_dir: build the tokenizer once, up front
    common.build_tokenizer([get_task("arithmetic", digits=1, ops="+")], run_dir, seed=0)
  # The oracle runs alone first: beside the two processes on 2 cores, its in-process collectives can starve past
  # XLA's rendezvous time-out, which aborts it (seen in CI).
  oracle = _spawn("rl", 1, 0, one, extra=[str(steps)],
                  env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  codes, olog = _wait(oracle, timeout=900)
  assert codes == [0], olog[0][-3000:]
  procs = _spawn("rl", 2, _free_port(), two, extra=[str(steps)])
  try:
    deadline = time.monotonic() + 900
    while not (two / "ckpt" / "2").is_dir():
      assert time.monotonic() < deadline and procs[1].poll() is None, f"no step-2 checkpoint ({procs[1].poll()})"
      time.sleep(0.1)
    procs[1].kill()
    t0 = time.monotonic()
    codes, logs = _wait(procs, timeout=120)
    assert codes[1] == -9 and codes[0] != 0, (codes, logs[0][-3000:])  # the survivor exits with an error
    assert time.monotonic() - t0 < 120
    assert not (two / "final_params.npz").exists(), "the run finished before the kill; nothing was resumed"
    procs = _spawn("rl", 2, _free_port(), two, extra=[str(steps)])
    codes, logs = _wait(procs, timeout=900)
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "resumed from" in logs[0]
    assert "[rl] process 1/2 builds 8 of 16 rollouts per step" in logs[1], logs[1][-3000:]
  finally:
    for p in [*oracle, *procs]:
      if p.poll() is None:
        p.kill()
  want, got = _deterministic(one), _deterministic(two)
  assert [r["step"] for r in got] == list(range(1, steps + 1))
  for w, g in zip(want, got):
    for k in ("reward_mean", "reward_std", "accuracy", "response_len", "zero_var_frac"):  # host values: exact
      assert g["metrics"][k] == w["metrics"][k], (w["step"], k, g["metrics"][k], w["metrics"][k])
    for k in ("loss", "grad_norm", "kl", "sample_entropy", "self_certainty_reward"):  # device values: to rounding
      np.testing.assert_allclose(g["metrics"][k], w["metrics"][k], rtol=1e-4, atol=1e-5, err_msg=f"step {w['step']} {k}")
  want_p, got_p = np.load(one / "final_params.npz"), np.load(two / "final_params.npz")
  assert set(want_p.files) == set(got_p.files)
  chex.assert_trees_all_close({k: got_p[k] for k in want_p.files}, {k: want_p[k] for k in want_p.files},
                              atol=1e-5, rtol=1e-5)


if __name__ == "__main__":
  mode, pid, n, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
  {"step": _worker_step, "dies": _worker_dies, "rl": _worker_rl}[mode](pid, n, port, out, *sys.argv[6:])
