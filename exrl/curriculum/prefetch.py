"""A background thread that builds the next batches while the current step runs.

  with Prefetcher(lambda i: jax.device_put(build(i), shardings), depth=2) as batches:
    for step in range(steps):
      batch = batches.get()          # item `step`, built (and on device) while step-1 ran

`produce(i)` is called for i = start, start+1, ... in order, in one worker thread, at most `depth` items
ahead of the consumer (a bounded queue, so a slow consumer never lets host memory grow). An exception in
`produce` is raised in the caller by the next `get()` (chained to the original), and the worker stops.
`close()` (also on leaving the `with`) stops the worker and joins it; no thread outlives the prefetcher.
JAX dispatch is thread-safe, so `produce` may `device_put` with the step's sharding: the host->device copy
then overlaps the running step too.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")

_POLL_S = 0.05  # how often a blocked worker re-checks for shutdown


class _Failure:
  def __init__(self, index: int, error: BaseException):
    self.index, self.error = index, error


class PrefetchError(RuntimeError):
  """Raised in the caller when `produce(index)` raised in the worker (the original is the __cause__)."""


class Prefetcher(Generic[T]):
  def __init__(self, produce: Callable[[int], T], *, depth: int = 2, start: int = 0, stop: int | None = None,
               name: str = "exrl-prefetch"):
    if depth < 1:
      raise ValueError(f"depth={depth} must be >= 1 (items built ahead of the consumer)")
    if stop is not None and stop < start:
      raise ValueError(f"stop={stop} must be >= start={start}")
    self.produce, self.start, self.stop = produce, start, stop
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop_event = threading.Event()
    self._next = start
    self._thread = threading.Thread(target=self._run, name=name, daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop_event.is_set():
      try:
        self._queue.put(item, timeout=_POLL_S)
        return True
      except queue.Full:
        continue
    return False

  def _run(self) -> None:
    i = self.start
    while not self._stop_event.is_set() and (self.stop is None or i < self.stop):
      try:
        item = self.produce(i)
      except BaseException as e:  # handed to the caller, which decides; the worker ends here
        self._put(_Failure(i, e))
        return
      if not self._put((i, item)):
        return
      i += 1
    self._put(StopIteration)

  def get(self, timeout: float | None = None) -> T:
    """The next item, in order. Raises PrefetchError if its `produce` raised, StopIteration past `stop`."""
    if self._stop_event.is_set():
      raise RuntimeError("Prefetcher.get() after close()")
    item = self._queue.get(timeout=timeout) if timeout is not None else self._get_blocking()
    if item is StopIteration:
      self._queue.put(StopIteration)  # stay exhausted for later calls
      raise StopIteration
    if isinstance(item, _Failure):
      self.close()
      raise PrefetchError(f"prefetch worker failed building item {item.index}: "
                          f"{type(item.error).__name__}: {item.error}") from item.error
    index, value = item
    assert index == self._next, (index, self._next)
    self._next += 1
    return value

  def _get_blocking(self):
    while True:
      try:
        return self._queue.get(timeout=_POLL_S)
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          raise RuntimeError("prefetch worker ended without producing the next item") from None

  def __iter__(self):
    while True:
      try:
        yield self.get()
      except StopIteration:
        return

  def close(self, timeout: float = 10.0) -> None:
    """Stop the worker and join it. A `produce` call in progress is let finish (it is not interrupted)."""
    self._stop_event.set()
    while True:  # unblock a worker waiting on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout)
    if self._thread.is_alive():
      raise RuntimeError(f"prefetch worker did not stop within {timeout} s (a produce() call is still running)")

  @property
  def alive(self) -> bool:
    return self._thread.is_alive()

  def __enter__(self) -> Prefetcher[T]:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
