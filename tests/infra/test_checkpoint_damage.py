"""Checkpointer.restore_latest on damaged checkpoints, safe re-save, and a save onto a full disk.

Each damage mode is applied to a copy of one pristine run (steps 1, 2, 3); the oracle for a restored
state is the numpy formula that built it, and "nothing valid is overwritten" is checked by hashing
every file of the valid steps and of the damaged step (now in quarantine/) before and after.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exrl.infra.checkpoint import Checkpointer, CheckpointError

REPO = Path(__file__).resolve().parents[2]
N = 3000  # floats per array: large enough that the array data is its own file


def _np_state(step: int) -> dict:
  rng = np.random.default_rng(step)
  return {"w_N": rng.standard_normal(N).astype(np.float32), "count": np.int32(step)}


def _state(step: int) -> dict:
  return {**jax.tree.map(jnp.asarray, _np_state(step)), "key": jax.random.key(step)}


ABSTRACT = jax.eval_shape(lambda: _state(0))


def _assert_state(state, step: int) -> None:
  want = _np_state(step)
  np.testing.assert_array_equal(np.asarray(state["w_N"]), want["w_N"])
  assert int(state["count"]) == step
  np.testing.assert_array_equal(jax.random.key_data(state["key"]), jax.random.key_data(jax.random.key(step)))


def _digest(d: Path) -> dict[str, str]:
  """relative path -> sha256 of every file under d."""
  return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
  d = tmp_path_factory.mktemp("pristine") / "ckpt"
  with Checkpointer(d, keep=3, async_save=False) as ckpt:
    for s in (1, 2, 3):
      ckpt.save(s, _state(s), {"step": s})
  return d


@pytest.fixture
def ckdir(pristine, tmp_path) -> Path:
  d = tmp_path / "ckpt"
  shutil.copytree(pristine, d)
  return d


def _array_files(step_dir: Path) -> list[Path]:
  files = sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
  assert files, step_dir
  return files


def _truncate_array(d):
  big = _array_files(d / "3")[-1]
  big.write_bytes(big.read_bytes()[:100])


def _delete_array(d):
  _array_files(d / "3")[-1].unlink()


def _delete_state_metadata(d):
  (d / "3" / "state" / "_METADATA").unlink()


DAMAGE = {  # mode -> (damage, damaged step, step to resume from)
    "truncated_array_file": (_truncate_array, 3, 2),
    "deleted_array_file": (_delete_array, 3, 2),
    "deleted_state_METADATA": (_delete_state_metadata, 3, 2),
    "empty_step_dir": (lambda d: (d / "4").mkdir(), 4, 3),
}


@pytest.mark.parametrize("mode", list(DAMAGE))
def test_damaged_latest_falls_back_quarantines_and_resaves(ckdir, mode):
  damage, bad, good = DAMAGE[mode]
  damage(ckdir)
  valid_before = {s: _digest(ckdir / str(s)) for s in (1, 2, 3) if s < bad}
  bad_before = _digest(ckdir / str(bad))
  lines = []
  with Checkpointer(ckdir, keep=3, log=lines.append) as ckpt:
    step, state, meta = ckpt.restore_latest(ABSTRACT)
    assert (step, meta) == (good, {"step": good})
    _assert_state(state, good)
    assert len(lines) == 1, lines
    assert f"step {bad} in {ckdir} does not restore" in lines[0] and f"resuming from step {good}" in lines[0]
    moved = [p for p in (ckdir / "quarantine").iterdir()]
    assert len(moved) == 1 and moved[0].name.startswith(f"{bad}-") and str(moved[0]) in lines[0]
    assert _digest(moved[0]) == bad_before  # renamed aside, byte for byte
    assert not (ckdir / str(bad)).exists()
    # the run goes on: the next step is saved where the damaged one was (no StepAlreadyExistsError)
    assert ckpt.save(good + 1, _state(good + 1), {"step": good + 1})
    ckpt.wait()
    assert ckpt.latest_step() == good + 1
  for s, dig in valid_before.items():
    if (ckdir / str(s)).exists():  # keep=3 may have rotated the oldest out
      assert _digest(ckdir / str(s)) == dig
  with Checkpointer(ckdir, keep=3, log=lines.append) as ckpt:
    step, state, _ = ckpt.restore_latest(ABSTRACT)
  assert step == good + 1
  _assert_state(state, good + 1)


@pytest.mark.parametrize("which", ["latest", "all"])
def test_lost_checkpoint_metadata_still_resumes_from_latest(ckdir, which):
  for s in ((3,) if which == "latest" else (1, 2, 3)):
    (ckdir / str(s) / "_CHECKPOINT_METADATA").unlink()
  lines = []
  with Checkpointer(ckdir, keep=3, log=lines.append) as ckpt:
    step, state, meta = ckpt.restore_latest(ABSTRACT)
  assert (step, meta) == (3, {"step": 3})  # state and meta are intact: nothing to lose by falling back
  _assert_state(state, 3)
  assert len(lines) == 1 and "lost its _CHECKPOINT_METADATA" in lines[0]
  assert not (ckdir / "quarantine").exists()


def test_none_restores_stops_listing_steps_and_restart_moves_them_aside(ckdir):
  for s in (1, 2, 3):
    (ckdir / str(s) / "state" / "_METADATA").unlink()
  (ckdir / "5").mkdir()
  before = _digest(ckdir)
  lines = []
  with Checkpointer(ckdir, keep=3, log=lines.append) as ckpt:
    with pytest.raises(CheckpointError) as err:
      ckpt.restore_latest(ABSTRACT)
    msg = str(err.value)
    for s in (5, 3, 2, 1):
      assert f"step {s}: " in msg
    assert "Nothing was changed" in msg and "restart=True" in msg
    assert _digest(ckdir) == before and lines == []
    assert ckpt.restore_latest(ABSTRACT, restart=True) == (0, None, None)
  assert sorted(os.listdir(ckdir)) == ["quarantine"]
  assert sorted(os.listdir(ckdir / "quarantine")) == [
      "1-no-state-metadata", "2-no-state-metadata", "3-no-state-metadata", "5-empty"]
  assert len(lines) == 4
  with Checkpointer(ckdir, keep=3) as ckpt:  # after an explicit restart, an empty run is a fresh start
    assert ckpt.restore_latest(ABSTRACT) == (0, None, None)
    assert ckpt.save(1, _state(1), {"step": 1})  # quarantine/ does not confuse orbax's step listing
    ckpt.wait()
    step, state, _ = ckpt.restore_latest(ABSTRACT)
  assert step == 1
  _assert_state(state, 1)


def test_fresh_dir_and_explicit_restore_api(tmp_path, ckdir):
  with Checkpointer(tmp_path / "new") as ckpt:
    assert ckpt.restore_latest(ABSTRACT) == (0, None, None)
  (ckdir / "3" / "_CHECKPOINT_METADATA").unlink()
  with Checkpointer(ckdir) as ckpt:
    assert ckpt.latest_step() == 2 and ckpt.step_dirs() == [1, 2, 3]
    state, meta = ckpt.restore(3, ABSTRACT)  # explicit restore accepts a step with intact items
  _assert_state(state, 3)


def test_saving_a_step_left_on_disk_moves_the_old_copy_aside(ckdir):
  (ckdir / "3" / "state" / "_METADATA").unlink()  # e.g. an older caller that skipped it via latest_step()
  old = _digest(ckdir / "3")
  lines = []
  with Checkpointer(ckdir, keep=3, log=lines.append) as ckpt:
    state, _ = ckpt.restore(2, ABSTRACT)
    assert ckpt.save(3, _state(33), {"step": 3})
    ckpt.wait()
    assert not ckpt.save(3, _state(34), {"step": 3})  # a repeat within one run is a no-op
    with pytest.raises(ValueError, match="step=2 is older than the checkpoint step=3"):
      ckpt.save(2, state, {})
    state, meta = ckpt.restore(3, ABSTRACT)
  _assert_state(state, 33)
  assert len(lines) == 1 and "moved the old copy" in lines[0]
  assert _digest(ckdir / "quarantine" / "3-replaced") == old


_FULL_DISK_RUN = textwrap.dedent("""
  import sys
  import jax, jax.numpy as jnp
  from exrl import cli
  from exrl.infra.checkpoint import Checkpointer

  def main(d):
    with Checkpointer(d, keep=2) as ckpt:
      for s in range(1, 100):
        w_N = jax.random.normal(jax.random.key(s), (20000,))  # random: zstd cannot shrink it
        ckpt.save(s, {"w_N": w_N, "key": jax.random.key(s)}, {"step": s})

  if __name__ == "__main__":
    cli.run(main, sys.argv[1])
""")


def _can_mount_tmpfs() -> bool:
  if sys.platform != "linux" or shutil.which("unshare") is None:
    return False
  probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                         capture_output=True)
  return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -m` + tmpfs mount (root in a mount namespace)")
def test_disk_full_ends_with_one_line_and_last_good_checkpoint_restores(tmp_path):
  mnt, out = tmp_path / "mnt", tmp_path / "copied"
  mnt.mkdir()
  script = tmp_path / "run.py"
  script.write_text(_FULL_DISK_RUN)
  # a 300 KiB tmpfs holds two ~120 KiB steps (keep=2), then fills while the third is written
  shell = (f"mount -t tmpfs -o size=300k tmpfs {mnt} && "
           f"{sys.executable} {script} {mnt}/ckpt 2>{tmp_path}/err; echo $? > {tmp_path}/rc; "
           f"cp -a {mnt}/ckpt {out}")
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  subprocess.run(["unshare", "-m", "sh", "-c", shell], check=True, env=env, cwd=REPO, timeout=300)
  err = (tmp_path / "err").read_text()
  assert (tmp_path / "rc").read_text().strip() == "2", err
  lines = err.splitlines()
  assert len(lines) == 1, err  # nothing but the one line: no orbax / asyncio tracebacks
  assert lines[0].startswith("error: could not write checkpoint step ")
  assert f"to {mnt}/ckpt: disk full" in lines[0] and "is intact" in lines[0]
  last_good = int(lines[0].split("the last committed step ")[1].split()[0])
  with Checkpointer(out, keep=2) as ckpt:
    step, state, meta = ckpt.restore_latest(jax.eval_shape(
        lambda: {"w_N": jnp.zeros(20000, jnp.float32), "key": jax.random.key(0)}))
  assert step == last_good >= 1 and meta == {"step": last_good}
  np.testing.assert_array_equal(np.asarray(state["w_N"]), np.asarray(jax.random.normal(jax.random.key(last_good), (20000,))))


_FILE_SIZE_LIMIT_RUN = textwrap.dedent("""
  import resource, signal, sys
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
  import jax
  from exrl import cli
  from exrl.infra.checkpoint import Checkpointer

  def main(d):
    with Checkpointer(d, keep=2, async_save=False) as ckpt:
      for s in range(1, 4):
        if s == 3:  # no file over 20 KB from here on: the next array file cannot be written
          resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
        ckpt.save(s, {"w_N": jax.random.normal(jax.random.key(s), (20000,))}, {"step": s})

  if __name__ == "__main__":
    cli.run(main, sys.argv[1])
""")


def test_write_limit_without_mount_ends_with_one_line_and_step_2_restores(tmp_path):
  """The same path as a full disk, runnable anywhere: RLIMIT_FSIZE makes writes fail with EFBIG."""
  script = tmp_path / "run.py"
  script.write_text(_FILE_SIZE_LIMIT_RUN)
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=300)
  assert out.returncode == 2, out.stderr
  lines = out.stderr.splitlines()
  assert len(lines) == 1, out.stderr
  assert lines[0].startswith(f"error: could not write checkpoint step 3 (0.1 MiB of arrays) to {tmp_path / 'ckpt'}: "
                             "file size limit (") and "the last committed step 2 is intact" in lines[0]
  with Checkpointer(tmp_path / "ckpt", keep=2) as ckpt:
    step, state, meta = ckpt.restore_latest(jax.eval_shape(
        lambda: {"w_N": jnp.zeros(20000, jnp.float32)}))
  assert step == 2 and meta == {"step": 2}
  np.testing.assert_array_equal(np.asarray(state["w_N"]), np.asarray(jax.random.normal(jax.random.key(2), (20000,))))
