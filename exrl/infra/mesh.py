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
  """Mesh shape; -1 on `data` takes all remaining devices."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
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

