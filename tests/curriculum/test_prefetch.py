"""Prefetcher: order, boundedness, worker errors in the caller, clean shutdown, device_put overlap."""
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exrl.curriculum.prefetch import PrefetchError, Prefetcher


def _prefetch_threads():
  return [t for t in threading.enumerate() if t.name.startswith("exrl-prefetch")]


def test_items_in_order_and_bounded_ahead():
  built = []

  def produce(i):
    built.append(i)
    return i * i

  with Prefetcher(produce, depth=2, start=3, stop=10) as pf:
    time.sleep(0.3)
    # depth items queued, plus at most one built and waiting to be put
    assert len(built) <= 3
    assert list(pf) == [i * i for i in range(3, 10)]
    with pytest.raises(StopIteration):
      pf.get()
  assert not _prefetch_threads()


def test_worker_exception_is_raised_in_caller():
  def produce(i):
    if i == 2:
      raise KeyError("bad batch")
    return i

  pf = Prefetcher(produce, depth=4)
  assert [pf.get(), pf.get()] == [0, 1]
  with pytest.raises(PrefetchError, match="item 2: KeyError") as info:
    pf.get()
  assert isinstance(info.value.__cause__, KeyError)
  assert not pf.alive and not _prefetch_threads()


def test_close_while_worker_is_blocked_leaves_no_thread():
  pf = Prefetcher(lambda i: np.zeros(4) + i, depth=1)
  time.sleep(0.2)  # the worker now blocks on the full queue
  pf.close()
  assert not pf.alive and not _prefetch_threads()
  with pytest.raises(RuntimeError, match="after close"):
    pf.get()


def test_device_put_with_sharding_in_worker():
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  n = len(jax.devices()) * 2
  with Prefetcher(lambda i: jax.device_put(np.arange(n, dtype=np.int32) + i, sharding), depth=2, stop=3) as pf:
    out = list(pf)
  for i, x in enumerate(out):
    assert x.sharding == sharding
    np.testing.assert_array_equal(np.asarray(jnp.sum(x)), np.arange(n).sum() + n * i)
