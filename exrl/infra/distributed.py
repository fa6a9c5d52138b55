"""Multi-host set-up: one program per host, one global Mesh (jax.distributed), per-process data, process-0 output.

  init(DistributedConfig(coordinator="10.0.0.2:1234", num_processes=4, process_id=1))   # explicit flags
  init(DistributedConfig())   # from EXRL_COORDINATOR/EXRL_NUM_PROCESSES/EXRL_PROCESS_ID, SLURM, or a TPU pod

Sources, in order: the flags; EXRL_* variables; SLURM (SLURM_NTASKS, SLURM_PROCID, first host of SLURM_JOB_NODELIST
on EXRL_COORDINATOR_PORT, default 12345); on a TPU pod (or with EXRL_DISTRIBUTED=1, as tpu_scripts/launch.sh sets)
jax reads everything from the TPU metadata (no flags).
Bad flags fail before anything waits on the network: a process id outside [0, num_processes), a coordinator that
is not host:port, a coordinator no TCP connection reaches within `connect_timeout_s` (checked by every process but
the one that hosts it), and, after start-up, a mesh that the global device count does not fill. A process that
dies is noticed by the others through the coordination service's heartbeat (`heartbeat_timeout_s`), which ends
them with an error instead of a hang.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import socket
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from exrl.infra import mesh as mesh_lib


class DistributedError(RuntimeError):
  """Bad multi-host configuration; the message names the value and what would be valid."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Flags for jax.distributed; None fields come from the environment (see the module docstring)."""
  coordinator: str | None = None  # host:port of process 0's coordination service
  num_processes: int | None = None
  process_id: int | None = None
  connect_timeout_s: float = 60.0  # bounded wait for the coordinator's port to accept connections
  init_timeout_s: int = 120  # jax.distributed: all processes must join within this
  heartbeat_timeout_s: int = 30  # a silent peer is declared dead (and the run ends) after this
  cpu_collectives: str = "gloo"  # CPU-only runs (tests, localhost)


@dataclasses.dataclass(frozen=True)
class Resolved:
  coordinator: str | None
  num_processes: int | None
  process_id: int | None
  source: str  # flags | env | slurm | tpu | single


def _int(name: str, value) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise DistributedError(f"{name}={value!r} is not an integer") from None


def _first_slurm_host(nodelist: str) -> str:
  """'node[03-05,9],gpu1' -> 'node03' (the first host of a SLURM hostlist)."""
  m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
  if not m:
    raise DistributedError(f"SLURM_JOB_NODELIST={nodelist!r} is not a hostlist")
  prefix, _, ranges = m.groups()
  if not ranges:
    return prefix
  return prefix + ranges.split(",")[0].split("-")[0]


def resolve(cfg: DistributedConfig, env: Mapping[str, str] | None = None) -> Resolved:
  """Where the process count, id and coordinator come from; validates them (no network)."""
  env = os.environ if env is None else env
  if cfg.coordinator or cfg.num_processes is not None or cfg.process_id is not None:
    r = Resolved(cfg.coordinator, cfg.num_processes, cfg.process_id, "flags")
  elif "EXRL_COORDINATOR" in env or "EXRL_NUM_PROCESSES" in env:
    r = Resolved(env.get("EXRL_COORDINATOR"), _int("EXRL_NUM_PROCESSES", env.get("EXRL_NUM_PROCESSES")),
                 _int("EXRL_PROCESS_ID", env.get("EXRL_PROCESS_ID")), "env")
  elif "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
    host = _first_slurm_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "")
    port = env.get("EXRL_COORDINATOR_PORT", "12345")
    r = Resolved(f"{host}:{port}", _int("SLURM_NTASKS", env["SLURM_NTASKS"]),
                 _int("SLURM_PROCID", env["SLURM_PROCID"]), "slurm")
  elif env.get("EXRL_DISTRIBUTED") or any(k in env for k in ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID",
                                                                "CLOUD_TPU_TASK_ID")):
    return Resolved(None, None, None, "tpu")  # jax's TPU cluster detection fills everything in
  else:
    return Resolved(None, 1, 0, "single")
  return _validate(r)


def _validate(r: Resolved) -> Resolved:
  if r.num_processes is None or r.process_id is None or not r.coordinator:
    raise DistributedError(f"multi-process set-up from {r.source} needs coordinator, num_processes and process_id; "
                           f"got coordinator={r.coordinator!r}, num_processes={r.num_processes}, "
                           f"process_id={r.process_id}")
  if r.num_processes < 1:
    raise DistributedError(f"num_processes={r.num_processes} must be >= 1")
  if not 0 <= r.process_id < r.num_processes:
    raise DistributedError(f"process_id={r.process_id} is out of range for num_processes={r.num_processes}; "
                           f"valid ids are 0..{r.num_processes - 1}")
  host, port = split_address(r.coordinator)
  del host, port
  return r


def split_address(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(f"coordinator={address!r} must be host:port with a port in 1..65535")
  return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Poll a TCP connect to host:port until it succeeds or `timeout_s` passes (then DistributedError)."""
  host, port = split_address(address)
  deadline = time.monotonic() + timeout_s
  last = None
  while True:
    try:
      with socket.create_connection((host, port), timeout=min(2.0, max(timeout_s, 0.1))):
        return
    except OSError as e:
      last = e
    if time.monotonic() >= deadline:
      raise DistributedError(f"coordinator {address} is unreachable after {timeout_s:g} s ({last}); start process 0 "
                             f"first, or check the address, port and firewall")
    time.sleep(0.2)


def init(cfg: DistributedConfig = DistributedConfig(), env: Mapping[str, str] | None = None) -> Resolved:
  """Start jax.distributed (no-op for a single process); call before any other jax use."""
  env = os.environ if env is None else env
  r = resolve(cfg, env)
  if r.source == "single" or (r.num_processes == 1 and r.source != "tpu"):
    return r
  if env.get("JAX_PLATFORMS", "") == "cpu":  # asking jax for its backend here would start it too early
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
  if r.source != "tpu" and r.process_id != 0:
    wait_for_coordinator(r.coordinator, cfg.connect_timeout_s)
  jax.distributed.initialize(r.coordinator, num_processes=r.num_processes, process_id=r.process_id,
                             initialization_timeout=int(cfg.init_timeout_s),
                             heartbeat_timeout_seconds=int(cfg.heartbeat_timeout_s))
  return r


def global_mesh(cfg: mesh_lib.MeshConfig = mesh_lib.MeshConfig()) -> Mesh:
  """The Mesh over every process's devices; a shape the global device count does not fill is an error."""
  n, local, procs = jax.device_count(), jax.local_device_count(), jax.process_count()
  fixed = cfg.fsdp * cfg.tensor * (cfg.data if cfg.data != -1 else 1)
  if cfg.data == -1 and n % fixed == 0 or cfg.data != -1 and fixed == n:
    return mesh_lib.make_mesh(cfg)
  raise DistributedError(f"mesh data={cfg.data}, fsdp={cfg.fsdp}, tensor={cfg.tensor} does not fill the {n} devices "
                         f"({procs} processes x {local} local); data*fsdp*tensor must equal {n}"
                         + (f" (or data=-1 with fsdp*tensor dividing {n})" if cfg.data != -1 else ""))


def process_rows(n_rows: int, mesh: Mesh) -> slice:
  """The contiguous rows of a global batch of n_rows (sharded over data, fsdp) that this process's devices hold."""
  div = mesh_lib.batch_divisor(mesh)
  if n_rows % div:
    raise DistributedError(f"{n_rows} rows do not split over data*fsdp={div} of the mesh {dict(mesh.shape)}")
  sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
  idx = sorted({(s[0].start or 0, s[0].stop if s[0].stop is not None else n_rows)
                for s in sharding.addressable_devices_indices_map((n_rows,)).values()})
  lo, hi = idx[0][0], idx[-1][1]
  covered = sum(b - a for a, b in idx)
  if covered != hi - lo:
    raise DistributedError(f"process {jax.process_index()} holds non-contiguous rows {idx} of the mesh "
                           f"{dict(mesh.shape)}; order the mesh so each process owns one block of the batch axes")
  return slice(lo, hi)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, row_axis: int = 1) -> dict[str, jax.Array]:
  """Assemble global arrays from each process's rows ([M, Bm_local, ...] host arrays, rows on `row_axis`).

  Every process passes the same-shaped local slice; the global array has Bm_local * process_count rows, sharded
  over (data, fsdp) on `row_axis` (jax.make_array_from_process_local_data).
  """
  out = {}
  for name, x in local_batch.items():
    x = np.asarray(x)
    spec = [None] * x.ndim
    spec[row_axis] = mesh_lib.BATCH_AXES
    sharding = NamedSharding(mesh, P(*spec))
    global_shape = list(x.shape)
    global_shape[row_axis] *= jax.process_count()
    out[name] = jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))
  return out


# ---- host values every process must agree on, and rows between processes and the global batch


def agree_max(value: int) -> int:
  """The largest of every process's `value` (one process: `value`)."""
  return int(host_allgather(np.asarray([value])).max())


def global_rows(local_BxN: np.ndarray, mesh) -> jax.Array:
  """This process's rows -> one global array, rows over the mesh's batch axes, in process order."""
  x = np.asarray(local_BxN)
  sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES, *[None] * (x.ndim - 1)))
  return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * jax.process_count(), *x.shape[1:]))


def local_rows(tree, mesh):
  """Global arrays (rows first) -> host numpy of this process's contiguous block of rows."""
  from jax.experimental import multihost_utils

  def one(x):
    spec = P(mesh_lib.BATCH_AXES, *[None] * (x.ndim - 1))
    x = _rows_over_batch(mesh, x.ndim)(x)
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))
  return jax.tree.map(one, tree)


@functools.lru_cache(maxsize=None)
def _rows_over_batch(mesh: Mesh, ndim: int):
  """A jitted identity laying rows over the batch axes: one per (mesh, rank), so steps reuse its compilations."""
  return jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P(mesh_lib.BATCH_AXES, *[None] * (ndim - 1))))


def host_allgather(tree):
  """Host arrays of every process, concatenated along the first axis in process order (one process: unchanged)."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils
  gather = lambda x: np.asarray(multihost_utils.process_allgather(np.atleast_1d(np.asarray(x)), tiled=True))
  return jax.tree.map(gather, tree)


def agree_sum(value) -> float:
  """The sum of every process's `value`."""
  return float(host_allgather(np.asarray([value])).sum())


def is_main() -> bool:
  return jax.process_index() == 0


def main_only(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Wrap fn so that it runs on process 0 only (metrics, logs, plots); returns None elsewhere."""
  def wrapped(*args, **kwargs):
    return fn(*args, **kwargs) if is_main() else None
  wrapped.__name__ = getattr(fn, "__name__", "main_only")
  wrapped.__doc__ = fn.__doc__
  return wrapped


class NullWriter:
  """What processes other than 0 get instead of a MetricsWriter: every call is a no-op."""

  def write(self, *args, **kwargs) -> None:
    del args, kwargs

  def summary(self, *args, **kwargs) -> None:
    del args, kwargs

  def close(self) -> None:
    pass


class MainProcessWriter:
  """A metrics writer that writes on process 0 and is silent elsewhere (same interface as MetricsWriter)."""

  def __init__(self, writer):
    self._writer = writer

  def __getattr__(self, name):
    attr = getattr(self._writer, name)
    return main_only(attr) if callable(attr) else attr


def to_host(tree) -> Any:
  """Fully replicated or sharded global arrays -> host numpy on every process (allgather when needed)."""
  from jax.experimental import multihost_utils
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
