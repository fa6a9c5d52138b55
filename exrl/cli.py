"""Entry-point wrapper: expected user errors end as ONE line on stderr, not a traceback.

  if __name__ == "__main__":
    cli.run(lambda: main(tyro.cli(Config)))   # or: cli.run(lambda: main(parse(sys.argv[1:])))

Parse argv inside the callable: `run` removes `--debug` from sys.argv first, and a parse error or a bad value
found while parsing is then reported the same way.

Caught (exit status 2): missing / unreadable / unwritable paths, disk full, bad JSON, missing config
keys, bad UTF-8, bad values (ValueError), checkpoint errors, a run directory another live launch holds
(RunLockedError), a resume under a config that changes the experiment (ConfigChangedError), and orbax /
tensorstore errors whose root cause is one of those. The line is `error: <what>` and names the file, field
or value the exception carries. Anything else is a bug and keeps its traceback (exit status 1).

`--debug` anywhere on the command line (removed before `main` parses argv) or `EXRL_DEBUG=1` shows the
full traceback and leaves logging untouched. Without it, orbax's ERROR log records (a background save
thread's failure is logged with a traceback per handler) are held back and dropped when the run ends
with an expected error, and stderr is closed after the one line so interpreter shutdown cannot bury
it under asyncio / absl noise; on any other exit the held records are printed. The same holds for the
"Event loop is closed" errors that a failed save's late tensorstore callbacks print through `sys.excepthook`
while the checkpointer shuts down, before the error reaches `run`.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

EXIT_USER_ERROR = 2
_DISK = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file size limit exceeded",
         errno.EROFS: "read-only filesystem"}
_PERMISSION = {errno.EACCES, errno.EPERM}
_MAX_LINE = 600  # one terminal-friendly line; long tensorstore specs are cut


def debug_enabled(argv: list[str] | None = None) -> bool:
  argv = sys.argv if argv is None else argv
  return "--debug" in argv or os.environ.get("EXRL_DEBUG", "") not in ("", "0", "false", "False")


def _chain(e: BaseException) -> list[BaseException]:
  out = [e]
  while (nxt := out[-1].__cause__ or out[-1].__context__) is not None and len(out) < 20:
    out.append(nxt)
  return out


def _one_line(text: str) -> str:
  line = " ".join(str(text).split())
  return line if len(line) <= _MAX_LINE else line[:_MAX_LINE - 3] + "..."


def _where(e: BaseException) -> str:
  """' (in <file>:<line> <function>)' for the innermost frame of this repo or experiments, else ''."""
  root = Path(__file__).resolve().parents[1]
  frames = [f for f in traceback.extract_tb(e.__traceback__)
            if Path(f.filename).resolve().is_relative_to(root)] if e.__traceback__ else []
  if not frames:
    return ""
  f = frames[-1]
  return f" (in {Path(f.filename).resolve().relative_to(root)}:{f.lineno} {f.name})"


def _file_in_frames(e: BaseException) -> str | None:
  """The innermost local variable naming an existing file: the file being parsed when e was raised."""
  tb, found = e.__traceback__, None
  while tb is not None:
    for name, value in tb.tb_frame.f_locals.items():
      if isinstance(value, (str, os.PathLike)) and not name.startswith("_"):
        try:
          if len(os.fspath(value)) < 4096 and Path(value).is_file():
            found = os.fspath(value)
        except (OSError, ValueError, TypeError):
          pass
    tb = tb.tb_next
  return found


def _os_message(e: OSError) -> str:
  name = e.filename if e.filename is not None else None
  target = f" {name}" + (f" -> {e.filename2}" if e.filename2 else "") if name else ""
  if e.errno in _DISK:
    return _one_line(f"{_DISK[e.errno]}{' writing' + target if target else ''}: "
                     f"{e.strerror or e}; free space there or point the run at another directory")
  if e.errno in _PERMISSION or isinstance(e, PermissionError):
    return _one_line(f"permission denied:{target or ' ' + str(e)}")
  if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) and target:
    return _one_line(f"{e.strerror}:{target}")
  return _one_line(str(e))


def _is_instance(e: BaseException, module: str, *names: str) -> bool:
  """isinstance against classes of `module` only if it was imported (an exception of it implies it was)."""
  mod = sys.modules.get(module)
  return mod is not None and isinstance(e, tuple(getattr(mod, n) for n in names))


def user_error_message(e: BaseException) -> str | None:
  """The one-line message for an expected user error, or None for a bug (which keeps its traceback)."""
  if _is_instance(e, "exrl.infra.checkpoint", "CheckpointError", "CheckpointWriteError") or _is_instance(
      e, "exrl.tasks.pool", "WorkerStartError") or _is_instance(e, "exrl.infra.runlock", "RunLockedError") or (
      _is_instance(e, "exrl.infra.lineage", "ConfigChangedError")):
    return _one_line(e.strerror if isinstance(e, OSError) and e.strerror else str(e))
  if isinstance(e, json.JSONDecodeError):
    where = _file_in_frames(e)
    return _one_line(f"{where + ' is ' if where else ''}not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
                     + ("" if where else _where(e)))
  if isinstance(e, UnicodeDecodeError):
    where = _file_in_frames(e)
    return _one_line(f"{where + ' is ' if where else ''}not valid {e.encoding}: byte {e.object[e.start:e.start + 1]!r} "
                     f"at offset {e.start} ({e.reason})" + ("" if where else _where(e)))
  if isinstance(e, KeyError):
    where = _file_in_frames(e)
    key = e.args[0] if e.args else "?"
    return _one_line(f"missing field {key!r}" + (f" in {where}" if where else _where(e)))
  if isinstance(e, OSError) and (e.errno is not None or isinstance(e, (FileNotFoundError, PermissionError))):
    return _os_message(e)
  if isinstance(e, ValueError):
    # orbax / tensorstore wrap the OS failure; report the root cause when it is a disk or permission one
    for inner in _chain(e)[1:]:
      if isinstance(inner, OSError) and inner.errno is not None:
        return _os_message(inner)
    msg = str(e)
    if "RESOURCE_EXHAUSTED" in msg or "No space left" in msg:
      return _one_line(f"disk full: {msg}")
    return _one_line(msg) if msg else None
  for inner in _chain(e)[1:]:  # e.g. orbax's bare Exception around a tensorstore ValueError / OSError
    if isinstance(inner, (OSError, json.JSONDecodeError, UnicodeDecodeError)) or (
        isinstance(inner, ValueError) and ("RESOURCE_EXHAUSTED" in str(inner) or "No space left" in str(inner))):
      return user_error_message(inner)
  return None


class _HoldOrbaxErrors(logging.Filter):
  """Holds orbax's ERROR records (with their tracebacks) until the run's outcome is known."""

  def __init__(self):
    super().__init__()
    self.held: list[logging.LogRecord] = []

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and "orbax" in (record.pathname or ""):
      if len(self.held) < 200:
        self.held.append(record)
      return False
    return True


class _HoldClosedLoopErrors:
  """A `sys.excepthook` that holds "Event loop is closed" errors raised by callbacks from native threads.

  After a failed orbax save, tensorstore futures can complete after orbax has closed its event loop; the
  native thread then calls `loop.call_soon_threadsafe`, which raises, and the error is printed via
  `sys.excepthook` (a bare two-frame traceback). Everything else goes straight to the previous hook.
  """

  def __init__(self, previous):
    self.previous = previous
    self.held: list[tuple] = []

  def __call__(self, kind, value, tb) -> None:
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed" and len(self.held) < 200:
      self.held.append((kind, value, tb))
      return
    self.previous(kind, value, tb)

  def release(self, replay: bool) -> None:
    if sys.excepthook is self:
      sys.excepthook = self.previous
    if replay:
      for exc_info in self.held:
        self.previous(*exc_info)
    self.held.clear()


def run(main_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
  """Calls `main_fn(*args, **kwargs)`; an expected user error prints `error: ...` and exits 2."""
  debug = debug_enabled()
  sys.argv = [a for a in sys.argv if a != "--debug"]  # so tyro / argparse never see it
  if debug:
    return main_fn(*args, **kwargs)
  held = _HoldOrbaxErrors()
  absl_logger = logging.getLogger("absl")  # orbax logs through absl, which logs to this logger
  absl_logger.addFilter(held)
  loop_errors = sys.excepthook = _HoldClosedLoopErrors(sys.excepthook)
  try:
    out = main_fn(*args, **kwargs)
  except BaseException as e:  # noqa: BLE001 -- classified below; bugs re-raise unchanged
    msg = None if isinstance(e, (KeyboardInterrupt, SystemExit)) else user_error_message(e)
    if msg is None:
      _replay(held, absl_logger)
      loop_errors.release(replay=True)
      raise
    absl_logger.removeFilter(held)
    loop_errors.held.clear()  # the hook stays: late callbacks until exit are dropped too
    sys.stdout.flush()
    print(f"error: {msg}  (--debug or EXRL_DEBUG=1 for the traceback)", file=sys.stderr, flush=True)
    _silence_stderr()
    sys.exit(EXIT_USER_ERROR)
  _replay(held, absl_logger)
  loop_errors.release(replay=True)
  return out


def _replay(held: _HoldOrbaxErrors, logger: logging.Logger) -> None:
  """Prints the held records after all: the run did not end with an explained error."""
  logger.removeFilter(held)
  for record in held.held:
    logger.handle(record)
  held.held.clear()


def _silence_stderr() -> None:
  """Points fd 2 at /dev/null so shutdown-time tracebacks (asyncio, absl threads) cannot follow the line."""
  try:
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
  except OSError:
    pass
