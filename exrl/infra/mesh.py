"""Mesh(data, fsdp, tensor), logical-axis sharding rules, and multi-host set-up."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical param axis -> mesh axis. Axes not listed (layers, head_dim) stay replicated.
DEFAULT_RULES = (("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"),
                 ("mlp", "tensor"))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape; -1 on `data` takes all remaining devices. rollout_devices > 0 splits the devices: the last that many
  run the RL rollout worker (`rollout_mesh`), the mesh spans the others."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  rollout_devices: int = 0


def _split(cfg: MeshConfig, devices) -> tuple[list, list]:
  """(train devices, rollout devices) of a device list."""
  devices, r = list(devices), cfg.rollout_devices
  if r and not 0 < r < len(devices):
    raise ValueError(f"MeshConfig.rollout_devices={r} must be in [1, {len(devices) - 1}] with {len(devices)} devices "
                     f"(0: no split; the rollout worker shares the mesh)")
  if r < 0:
    raise ValueError(f"MeshConfig.rollout_devices={r} must be >= 0")
  return (devices[:-r], devices[-r:]) if r else (devices, [])


def rollout_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  """The rollout worker's mesh: the last cfg.rollout_devices devices, all on `data` (params replicated)."""
  if not cfg.rollout_devices:
    raise ValueError("MeshConfig.rollout_devices=0: there is no rollout mesh (the worker shares the train mesh)")
  return make_mesh(MeshConfig(), _split(cfg, devices if devices is not None else jax.devices())[1])


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> Mesh:
  """The (train) mesh over `devices` (default: all), less the last cfg.rollout_devices."""
  devices = _split(cfg, devices if devices is not None else jax.devices())[0]
  n = len(devices)
  data = cfg.data if cfg.data != -1 else n // (cfg.fsdp * cfg.tensor)
  shape = (data, cfg.fsdp, cfg.tensor)
  if data < 1 or int(np.prod(shape)) != n:
    raise ValueError(f"mesh (data={cfg.data}, fsdp={cfg.fsdp}, tensor={cfg.tensor}) does not fit {n} devices; "
                     f"data*fsdp*tensor must equal {n}")
  # Auto axes: XLA's sharding propagation places intermediates (no sharding-in-types annotations needed).
  return jax.make_mesh(shape, AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def logical_to_spec(axes: tuple, shape: tuple, mesh: Mesh, rules=DEFAULT_RULES) -> P:
  """PartitionSpec for one leaf; a dim not divisible by its mesh axis stays replicated."""
  rules = dict(rules)
  spec = []
  for name, dim in zip(axes, shape):
    mesh_axis = rules.get(name)
    if mesh_axis is not None and (mesh.shape[mesh_axis] == 1 or dim % mesh.shape[mesh_axis]):
      mesh_axis = None
    spec.append(mesh_axis)
  return P(*spec)


def param_shardings(params_shapes, param_axes, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a params pytree (arrays or ShapeDtypeStructs) given its logical axes."""
  return jax.tree.map(lambda x, axes: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)),
                      params_shapes, param_axes, is_leaf=lambda x: isinstance(x, tuple) and not hasattr(x, "shape"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]

