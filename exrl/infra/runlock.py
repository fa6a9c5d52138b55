"""One run directory, one live run: an OS lock held by process 0 for the run's whole life.

  with runlock.hold(run_dir):       # raises RunLockedError if another live process holds run_dir
    ...train, evaluate, export...

  @runlock.holding(lambda cfg: cfg.run_dir)   # an entry point's main: the lock spans training and export
  def main(cfg): ...

The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on `run_dir/run.lock`. The kernel drops it when the holding
process dies for any reason, SIGKILL and OOM kills included, so a crashed run never leaves a stale lock and
the next launch simply takes it. The file stays behind after release (deleting it would let a third process
lock a fresh inode while a second still holds the old one); it holds the last holder's host, PID, start time
and command line, which a refused launch reports in its one line.

Holds nest within one process: an entry point's `hold` and the trainer's `hold` on the same directory are one
lock (flock would otherwise refuse the process its own second open of the file). Only JAX process 0 locks;
the other hosts of a multi-host run follow process 0 and write nothing of their own.

What is protected:
  * local and network filesystems with working flock (Linux ext4/xfs/tmpfs, NFSv4 and Lustre map it to
    byte-range locks): two launches on one run dir, from one machine or several, cannot both run. If the
    filesystem refuses locks (ENOLCK / EOPNOTSUPP), one warning line is printed and the run continues unlocked.
  * `gs://` (and other object-store) run dirs: object stores have no locks. The lock is then a local file,
    `$EXRL_CACHE_DIR/locks/<sha256 of the URL>.lock` (default `~/.cache/exrl/locks`), so two launches on the
    SAME machine are refused; two machines writing one bucket path are NOT protected. Launch such runs from
    one scheduler that never starts a job twice (or give each attempt its own run dir).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import hashlib
import json
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

LOCK_NAME = "run.lock"
_READ_TRIES = 20  # a holder writes its line right after locking; a reader may catch the file empty for a moment


class RunLockedError(RuntimeError):
  """Another live process holds the run directory's lock (cli.run reports it in one line, exit status 2)."""


_held: dict[str, list] = {}  # lock path -> [fd, depth]: the locks this process holds
_guard = threading.Lock()


def lock_path(run_dir: str | os.PathLike) -> Path:
  """The file whose flock guards `run_dir` (a local stand-in for gs:// URLs; see the module docstring)."""
  text = os.fspath(run_dir)
  if "://" in text:
    base = Path(os.environ.get("EXRL_CACHE_DIR") or Path.home() / ".cache" / "exrl") / "locks"
    return base / f"{hashlib.sha256(text.rstrip('/').encode()).hexdigest()[:32]}.lock"
  return Path(text).resolve() / LOCK_NAME  # one file however the directory is spelled


def _is_process_zero() -> bool:
  jax = sys.modules.get("jax")  # never import jax just for this; without it there is one process
  return jax is None or jax.process_index() == 0


def _holder_line(path: Path) -> str:
  """'host H, PID P, started T (cmd ...)' from the lock file, or what is known when it cannot be read."""
  for _ in range(_READ_TRIES):
    try:
      text = path.read_text()
    except OSError:
      text = ""
    if text.strip():
      try:
        info = json.loads(text)
        cmd = " ".join(info.get("argv", []))
        return (f"host {info['host']}, PID {info['pid']}, started {info['started']}"
                + (f" ({cmd[:160]})" if cmd else ""))
      except (ValueError, KeyError, TypeError):
        break
    threading.Event().wait(0.05)
  return "a process whose details could not be read from the lock file"


def _acquire(path: Path, run_dir: str) -> int | None:
  """Opens and flocks `path`; returns the fd (None where the filesystem has no locks). Raises RunLockedError."""
  import fcntl  # POSIX only; imported here so the module imports everywhere

  path.parent.mkdir(parents=True, exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise RunLockedError(
          f"run directory {run_dir} is in use by {_holder_line(path)}; it holds the lock {path}. Wait for that "
          f"run to end (or stop it), or pick another run directory; the lock frees itself when its holder dies"
      ) from None
    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
      print(f"[runlock] warning: the filesystem of {path} does not support locks ({e.strerror}); "
            f"running without protection against a second launch on {run_dir}", file=sys.stderr, flush=True)
      return None
    raise
  info = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "run_dir": run_dir, "argv": sys.argv}
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
  return fd


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike) -> Iterator[None]:
  """Holds `run_dir`'s lock for the body (re-entrant within a process); raises RunLockedError if another
  live process holds it. A no-op on JAX processes other than 0."""
  if not _is_process_zero():
    yield
    return
  path = lock_path(run_dir)
  key = os.fspath(path)
  with _guard:
    if key in _held:
      _held[key][1] += 1
    else:
      _held[key] = [_acquire(path, os.fspath(run_dir)), 1]
  try:
    yield
  finally:
    with _guard:
      entry = _held[key]
      entry[1] -= 1
      if entry[1] == 0:
        del _held[key]
        if entry[0] is not None:
          os.close(entry[0])  # closing the last fd of the open file releases the flock


def holding(run_dir_of: Callable[..., Any]) -> Callable:
  """Decorator: `fn(cfg, ...)` runs while holding `run_dir_of(cfg, ...)`'s lock (an entry point's main)."""

  def wrap(fn):
    @functools.wraps(fn)
    def locked(*args, **kwargs):
      with hold(run_dir_of(*args, **kwargs)):
        return fn(*args, **kwargs)
    return locked

  return wrap
