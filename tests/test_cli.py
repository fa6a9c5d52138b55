"""exrl.cli.run: each expected user error ends as one `error:` line naming the file / field / value, exit 2;
bugs keep their traceback (exit 1); --debug / EXRL_DEBUG=1 show it; orbax log noise and shutdown noise are
held back on the one-line path. Every case is a real subprocess, as a user would run an entry point."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = '''
import atexit, errno, json, logging, sys
from pathlib import Path
from exrl import cli

def main(case, arg):
  if case == "missing":
    return open(arg).read()
  if case == "permission":  # root ignores file modes, so raise what open() raises for a non-root user
    raise PermissionError(errno.EACCES, "Permission denied", arg)
  if case == "bad_json":
    path = Path(arg)
    return json.loads(path.read_text())
  if case == "missing_key":
    config_path = arg
    cfg = json.loads(Path(config_path).read_text())
    return cfg["hidden_size"]
  if case == "bad_utf8":
    data_file = arg
    return Path(data_file).read_text(encoding="utf-8")
  if case == "bad_value":
    raise ValueError("--rl.checkpoint-every=0 must be >= 1 (steps between checkpoints)")
  if case == "disk_full":
    raise OSError(errno.ENOSPC, "No space left on device", arg)
  if case == "wrapped_disk_full":  # orbax's shape: a bare Exception around tensorstore's ValueError
    try:
      raise ValueError('RESOURCE_EXHAUSTED: Error writing "w/0": Failed writing: "' + arg + '/d/x" [OS error 28]')
    except ValueError as inner:
      raise Exception("Encountered error while writing array") from inner
  if case == "checkpoint":
    from exrl.infra.checkpoint import CheckpointError
    raise CheckpointError("no checkpoint in " + arg + " restores (step 3: KeyError: 'meta')")
  if case == "bug":
    raise TypeError("unsupported operand: a bug, not a user error")
  if case == "argv":
    print(sys.argv[1:])
    return None
  if case == "noisy_ok":
    sys.path.insert(0, arg)
    import orbax_fake.noisy
    orbax_fake.noisy.log_error()
    return None
  if case == "noisy_fail":
    sys.path.insert(0, arg)
    import orbax_fake.noisy
    orbax_fake.noisy.log_error()
    atexit.register(lambda: print("Exception ignored in: <Event loop is closed>", file=sys.stderr))
    raise ValueError("bad --data path")
  if case in ("closed_loop_fail", "closed_loop_ok"):
    # what a late tensorstore callback does after a failed orbax save: native code calls into a closed
    # event loop and the error is printed through PyErr_Print -> sys.excepthook
    import ctypes
    ctypes.pythonapi.PyRun_SimpleString(b"import asyncio\\nloop = asyncio.new_event_loop()\\nloop.close()\\n"
                                        b"loop.call_soon_threadsafe(print)\\n")
    if case == "closed_loop_fail":
      raise OSError(errno.ENOSPC, "No space left on device", arg)
    return None
  raise SystemExit("unknown case " + case)

if __name__ == "__main__":
  cli.run(main, sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
'''

NOISY = '''
import logging
def log_error():
  try:
    raise RuntimeError("background save thread failed")
  except RuntimeError:
    logging.getLogger("absl").error("[process=0] Save Finalize thread failed", exc_info=True)
'''


def _run(tmp_path, *argv, env_extra=None):
  script = tmp_path / "entry.py"
  script.write_text(SCRIPT)
  env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
  env.pop("EXRL_DEBUG", None) if not env_extra or "EXRL_DEBUG" not in env_extra else None
  out = subprocess.run([sys.executable, str(script), *map(str, argv)], capture_output=True, text=True, env=env,
                       timeout=120, cwd=tmp_path)
  return out.returncode, out.stdout, out.stderr


def _one_line(err: str) -> str:
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith("error: ") and lines[0].endswith("(--debug or EXRL_DEBUG=1 for the traceback)")
  return lines[0]


def test_missing_file_and_permission_denied_name_the_path(tmp_path):
  rc, _, err = _run(tmp_path, "missing", tmp_path / "nope" / "config.json")
  assert rc == 2 and f"error: No such file or directory: {tmp_path / 'nope' / 'config.json'}" in _one_line(err)
  rc, _, err = _run(tmp_path, "permission", "/data/runs/x")
  assert rc == 2 and "error: permission denied: /data/runs/x" in _one_line(err)


def test_bad_json_missing_key_and_bad_utf8_name_the_file(tmp_path):
  bad = tmp_path / "config.json"
  bad.write_text('{"hidden_size": 8,,}')
  rc, _, err = _run(tmp_path, "bad_json", bad)
  assert rc == 2
  assert f"error: {bad} is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 19" \
      in _one_line(err)
  bad.write_text('{"vocab_size": 8}')
  rc, _, err = _run(tmp_path, "missing_key", bad)
  assert rc == 2 and f"error: missing field 'hidden_size' in {bad}" in _one_line(err)
  data = tmp_path / "data.jsonl"
  data.write_bytes(b'{"q": "caf\xe9"}\n')
  rc, _, err = _run(tmp_path, "bad_utf8", data)
  assert rc == 2 and f"error: {data} is not valid utf-8: byte b'\\xe9' at offset 10" in _one_line(err)


def test_bad_value_and_checkpoint_errors_are_one_line(tmp_path):
  rc, _, err = _run(tmp_path, "bad_value")
  assert rc == 2 and "error: --rl.checkpoint-every=0 must be >= 1 (steps between checkpoints)" in _one_line(err)
  rc, _, err = _run(tmp_path, "checkpoint", "/runs/a/ckpt")
  assert rc == 2 and "error: no checkpoint in /runs/a/ckpt restores (step 3: KeyError: 'meta')" in _one_line(err)


def test_disk_full_names_the_path_plain_and_wrapped_by_orbax(tmp_path):
  rc, _, err = _run(tmp_path, "disk_full", "/runs/a/metrics.jsonl")
  assert rc == 2 and "error: disk full writing /runs/a/metrics.jsonl: No space left on device" in _one_line(err)
  rc, _, err = _run(tmp_path, "wrapped_disk_full", "/runs/a/ckpt/8")
  line = _one_line(err)
  assert rc == 2 and line.startswith("error: disk full: RESOURCE_EXHAUSTED") and "/runs/a/ckpt/8/d/x" in line


def test_bugs_keep_their_traceback_and_debug_shows_it_for_user_errors(tmp_path):
  rc, _, err = _run(tmp_path, "bug")
  assert rc == 1 and "Traceback (most recent call last)" in err and "TypeError: unsupported operand" in err
  rc, _, err = _run(tmp_path, "bad_value", "--debug")
  assert rc == 1 and "Traceback (most recent call last)" in err and err.strip().endswith(
      "ValueError: --rl.checkpoint-every=0 must be >= 1 (steps between checkpoints)")
  rc, _, err = _run(tmp_path, "bad_value", env_extra={"EXRL_DEBUG": "1"})
  assert rc == 1 and "Traceback (most recent call last)" in err
  rc, out, _ = _run(tmp_path, "argv", "--debug")
  assert rc == 0 and out.strip() == "['argv']"  # --debug is taken out before main parses argv


@pytest.mark.parametrize("case", ["noisy_fail", "noisy_ok"])
def test_orbax_log_noise_is_held_back_only_when_the_line_explains_it(tmp_path, case):
  pkg = tmp_path / "orbax_fake"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "noisy.py").write_text(NOISY)
  rc, _, err = _run(tmp_path, case, tmp_path)
  if case == "noisy_fail":
    assert rc == 2 and "error: bad --data path" in _one_line(err)  # no log record, no atexit noise
  else:
    assert rc == 0 and "Save Finalize thread failed" in err and "background save thread failed" in err


@pytest.mark.parametrize("case", ["closed_loop_fail", "closed_loop_ok"])
def test_closed_event_loop_noise_is_held_back_only_when_the_line_explains_it(tmp_path, case):
  rc, _, err = _run(tmp_path, case, tmp_path / "ckpt")
  if case == "closed_loop_fail":
    assert rc == 2 and "disk full" in _one_line(err)
  else:  # a run that ends normally shows what it held
    assert rc == 0 and "RuntimeError: Event loop is closed" in err and "call_soon_threadsafe" in err
