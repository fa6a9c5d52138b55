"""Time-bounded verifier calls in worker processes: `VerifierPool`, `default_pool`, `verifier_rewards`.

Verifier calls run on model output, which is untrusted input: a parse can hang (sympy on a pathological expression) or
crash (an exception, or the interpreter dying). `VerifierPool` runs each call in a persistent worker process under a
wall-clock deadline. A call past its deadline has its worker killed and replaced; a call that raises, returns a
non-number, or kills its worker scores 0. Both are counted, never raised, so one bad sample cannot take a run down.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing as mp
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait as mp_wait
from typing import Any

import numpy as np

from exrl.tasks.verifiers import get_verifier

# Imported once by the forkserver, so replacing a killed worker costs a fork, not a fresh sympy import.
_PRELOAD = ["exrl.tasks.pool", "exrl.tasks", "math_verify"]


# A worker that has not said "ready" after this long is an infrastructure failure, not a bad sample.
START_TIMEOUT_S = 120.0


_GUARD = re.compile(r"""^[ \t]*if[ \t(]+(__name__[ \t]*==[ \t]*['"]__main__['"]|['"]__main__['"][ \t]*==[ \t]*__name__)""",
                    re.MULTILINE)


def main_guard_problem(start_method: str) -> str | None:
  """Why workers would fail to start because the running script lacks a `__main__` guard, or None.

  With "spawn" / "forkserver" each worker imports the main script again (as `__mp_main__`); without the guard that
  re-runs the script's top-level code there, which dies trying to start processes while bootstrapping (or worse,
  trains again). Interactive sessions and `python -c` have no main file and are fine.
  """
  if start_method == "fork":
    return None
  main = sys.modules.get("__main__")
  path = getattr(main, "__file__", None)
  if not path:
    return None
  try:
    source = open(path, encoding="utf-8", errors="replace").read()
  except OSError:
    return None
  if _GUARD.search(source):
    return None
  return (f"{path} has no `if __name__ == \"__main__\":` guard, so each verifier worker process (start method "
          f"{start_method!r}) would re-run the script when it imports it; put the script's top-level code under "
          "that guard, e.g. `if __name__ == \"__main__\": main()`")


class WorkerStartError(RuntimeError):
  """Verifier worker processes cannot be started at all (an infrastructure or script problem, not a sample's)."""


def _worker_main(conn) -> None:
  """Worker loop: say ready, then receive (fn, args), say started, and reply ("ok", float) or ("err", message).

  None or EOF ends it. "started" comes once the job is unpickled (fn's module imported), so an import that is
  slow on a loaded machine never counts against the call's own deadline.
  """
  # math-verify logs each of its own timeouts with the whole input (up to megabytes); the pool counts what matters
  logging.getLogger("math_verify").setLevel(logging.ERROR)
  conn.send(("ready", None))
  while True:
    try:
      msg = conn.recv()
    except (EOFError, OSError):
      return
    except BaseException as e:  # An unpicklable job (e.g. fn not importable here) is that job's error.
      conn.send(("err", f"could not unpickle job: {type(e).__name__}: {e}"))
      continue
    if msg is None:
      return
    fn, args = msg
    conn.send(("started", None))  # unpickled, so fn's module is imported: its deadline starts now
    try:
      conn.send(("ok", float(fn(*args))))
    except BaseException as e:  # Verifier bugs of any kind are scored 0, not propagated.
      conn.send(("err", f"{type(e).__name__}: {e}"[:500]))


class _Worker:
  """One worker process and the parent's end of its pipe, with the job it runs (if any) and that job's deadline."""

  def __init__(self, ctx):
    self.conn, child = ctx.Pipe(duplex=True)
    self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
    self.proc.start()
    child.close()  # Keep only the worker's copy, so its death reads as EOF here.
    self.ready = False
    self.job: int | None = None
    self.deadline = time.monotonic() + START_TIMEOUT_S

  def kill(self) -> None:
    self.proc.kill()
    self.proc.join(timeout=5)
    self.conn.close()

  def stop(self) -> None:
    try:
      self.conn.send(None)
    except (OSError, ValueError):
      pass
    self.proc.join(timeout=1)
    if self.proc.is_alive():
      self.kill()
    else:
      self.conn.close()


class VerifierPool:
  """Persistent worker processes that run verifier calls, each under `timeout_s` seconds of wall-clock time.

  A call's deadline starts when a ready worker has received and unpickled it (worker start-up and importing the
  verifier's module are not charged to it), so a batch of B
  calls takes about ceil(B / num_workers) * timeout_s at worst. `fn` and its arguments must be picklable, and `fn`
  importable by name in a fresh process (a module-level function of an importable module, not one defined in
  `__main__` or a lambda; those score 0 and count as errors). `map` is serialised by a lock, so threads may share a pool. The default "forkserver" start method forks workers from a clean server
  process: safe next to a multithreaded JAX parent, and cheap to replace after a kill.
  """

  def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, start_method: str = "forkserver"):
    if num_workers < 1:
      raise ValueError(f"num_workers={num_workers} must be >= 1")
    if not timeout_s > 0:
      raise ValueError(f"timeout_s={timeout_s} must be > 0")
    if start_method not in mp.get_all_start_methods():
      raise ValueError(f"start_method={start_method!r} is not available; use one of {mp.get_all_start_methods()}")
    self.num_workers, self.timeout_s = num_workers, float(timeout_s)
    self._ctx = mp.get_context(start_method)
    if start_method == "forkserver":
      self._ctx.set_forkserver_preload(_PRELOAD)
    self._workers: list[_Worker] = []
    self._lock = threading.Lock()
    self._warm: threading.Thread | None = None
    self._start_method = start_method
    self._guard_checked = False

  def _ensure_workers(self) -> None:
    if not self._guard_checked:  # before any worker starts: a guard-less script would print a traceback per worker
      problem = main_guard_problem(self._start_method)
      if problem:
        raise WorkerStartError(f"cannot start verifier worker processes: {problem}")
      self._guard_checked = True
    alive = []
    for w in self._workers:
      if w.proc.is_alive():
        alive.append(w)
      else:
        w.kill()
    self._workers = alive
    while len(self._workers) < self.num_workers:
      self._workers.append(_Worker(self._ctx))

  def _replace(self, w: _Worker) -> None:
    w.kill()
    self._workers[self._workers.index(w)] = _Worker(self._ctx)

  def map(self, fn: Callable[..., float], jobs: Sequence[tuple]) -> tuple[np.ndarray, dict[str, Any]]:
    """Runs fn(*job) for each job. Returns (scores float32[len(jobs)], info).

    A score is fn's value clipped to [0, 1]; timeouts, errors and non-finite values score 0. info holds the counts
    `verifier_timeouts` and `verifier_errors`, `verifier_time_s` (wall seconds for the batch) and the first few error
    messages under `verifier_error_examples`, and `verifier_latency_s` float64[len(jobs)]: each call's wall seconds
    from dispatch to its reply, its kill at the deadline, or its worker's death (NaN if it never ran). Raises WorkerStartError (a RuntimeError) only if worker processes
    cannot be started at all, naming the likely
    cause (e.g. a script without an `if __name__ == "__main__":` guard).
    """
    with self._lock:
      return self._map(fn, jobs)

  def _map(self, fn: Callable[..., float], jobs: Sequence[tuple]) -> tuple[np.ndarray, dict[str, Any]]:
    t0 = time.perf_counter()
    scores = np.zeros(len(jobs), np.float32)
    latency = np.full(len(jobs), np.nan)
    sent_at: dict[int, float] = {}
    timeouts = errors = start_failures = 0
    examples: list[str] = []

    def fail(msg: str) -> None:
      nonlocal errors
      errors += 1
      if len(examples) < 3:
        examples.append(msg)

    def lost_worker(w: _Worker, why: str) -> None:
      nonlocal start_failures
      if w.job is None:  # Died or hung before it was ready: not a sample's fault.
        start_failures += 1
        if start_failures > 3 * self.num_workers:
          hint = main_guard_problem(self._start_method) or (
              "a worker dies while importing the main module or the forkserver preloads "
              f"{_PRELOAD}; run one of them in a fresh python to see the error")
          raise WorkerStartError(f"verifier worker processes keep failing to start ({why}; last exit code "
                             f"{w.proc.exitcode}). Likely cause: {hint}")
      self._replace(w)

    self._ensure_workers()
    pending = deque(enumerate(jobs))
    retried: set[int] = set()
    while pending or any(w.job is not None for w in self._workers):
      for w in list(self._workers):
        if not (pending and w.ready and w.job is None):
          continue
        i, job = pending.popleft()
        try:
          w.conn.send((fn, tuple(job)))
        except (OSError, ValueError):  # The worker died while idle: replace it and retry the job once.
          self._replace(w)
          if i in retried:
            fail(f"job {i}: could not reach a verifier process")
          else:
            retried.add(i)
            pending.appendleft((i, job))
          continue
        except Exception as e:  # Pickling failed before anything was written: the worker is still clean.
          fail(f"job {i}: could not pickle: {type(e).__name__}: {e}")
          continue
        sent_at[i] = time.monotonic()
        # Unpickling imports fn's module (seconds on a loaded machine): not charged to the call's deadline.
        w.job, w.deadline = i, sent_at[i] + START_TIMEOUT_S
      watch = [w for w in self._workers if w.job is not None or not w.ready]
      if not watch:
        continue
      wait_s = max(0.0, min(w.deadline for w in watch) - time.monotonic())
      readable = set(mp_wait([w.conn for w in watch] + [w.proc.sentinel for w in watch], timeout=wait_s))
      now = time.monotonic()
      for w in watch:
        if w.job is not None and (w.conn in readable or w.proc.sentinel in readable or now >= w.deadline):
          latency[w.job] = now - sent_at[w.job]
        if w.conn in readable or w.proc.sentinel in readable:
          try:
            status, value = w.conn.recv()
          except (EOFError, OSError):
            w.proc.join(timeout=1)  # Reap it, so the exit code is known.
            if w.job is not None:
              fail(f"job {w.job}: verifier process died (exit code {w.proc.exitcode})")
            lost_worker(w, "died")
            continue
          if status == "ready":
            w.ready = True
            continue
          if status == "started":
            w.deadline = now + self.timeout_s
            continue
          i, w.job = w.job, None
          if status == "ok" and math.isfinite(value):
            scores[i] = min(max(value, 0.0), 1.0)
          else:
            fail(f"job {i}: {value if status == 'err' else f'non-finite score {value}'}")
        elif now >= w.deadline:
          if w.job is not None:
            timeouts += 1
          lost_worker(w, f"not ready after {START_TIMEOUT_S} s")
    info = {"verifier_timeouts": timeouts, "verifier_errors": errors,
            "verifier_time_s": time.perf_counter() - t0, "verifier_error_examples": examples, "verifier_latency_s": latency}
    return scores, info

  def warm_up(self) -> None:
    """Start the worker processes in a background thread (the forkserver imports math-verify: seconds), so the
    first `map` does not wait for them. Safe to call more than once; `map` and `close` wait for it."""
    if self._warm is None or not self._warm.is_alive():
      def start():
        with self._lock:
          self._ensure_workers()
      self._warm = threading.Thread(target=start, name="verifier-pool-warm-up", daemon=True)
      self._warm.start()

  def close(self) -> None:
    with self._lock:
      for w in self._workers:
        w.stop()
      self._workers = []

  def __enter__(self) -> VerifierPool:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


_DEFAULT_POOL: VerifierPool | None = None


def default_pool() -> VerifierPool:
  """A process-wide pool (2 workers, 5 s per call), created on first use and closed at exit."""
  global _DEFAULT_POOL
  if _DEFAULT_POOL is None:
    _DEFAULT_POOL = VerifierPool()
    atexit.register(_DEFAULT_POOL.close)
  return _DEFAULT_POOL


def verifier_rewards(responses: Sequence[str], problems: Sequence[Any],
                     verify: Callable[[str, Any], float] | None = None, *,
                     pool: VerifierPool | None = None) -> tuple[np.ndarray, dict[str, Any]]:
  """Verifier reward for each (response, problem) pair: float32[B] in [0, 1], plus info counts.

  verify: a picklable `(response, problem) -> score`, e.g. `task.verify` or `exrl.tasks.verify_math`. When None, each
    problem's verifier is looked up by `problem.task` in `exrl.tasks.VERIFIERS` (exact integer match for the built-in
    tasks, math-verify for datasets).
  pool: where calls run under their timeout; `default_pool()` when None.
  """
  if len(responses) != len(problems):
    raise ValueError(f"got {len(responses)} responses but {len(problems)} problems; they must pair up")
  pool = pool or default_pool()
  if verify is not None:
    return pool.map(verify, list(zip(responses, problems)))
  # Module-level verifiers pickle by reference: cheap to ship with every job.
  fns = [get_verifier(p.task) for p in problems]
  return pool.map(_call, [(f, r, p) for f, r, p in zip(fns, responses, problems)])


def _call(fn: Callable[[str, Any], float], response: str, problem: Any) -> float:
  return fn(response, problem)
