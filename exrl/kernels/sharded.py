"""Token statistics with the vocabulary sharded over a mesh axis (tensor parallel LM head), via jax.shard_map.

Each shard runs kernels.token_stats on its [D, V/S] slice of w, then the partial statistics are merged in log space:
lse = M + log psum(exp(lse_k − M)) with M = pmax(lse_k), and the rest as shard-weighted sums with weights
p(shard k) = exp(lse_k − lse). The merge is plain differentiable jnp, so gradients flow through each shard's custom_vjp.
The Pallas kernels run in shard_map's unchecked mode (check_vma=False): a pallas_call cannot say over which mesh axes
its outputs vary (its out_shape has no manual_axis_type), which the checked mode requires. Unchecked mode has the same
values and gradients, with possibly less economical transposes (JAX JEP 17111); the other implementations stay checked.
"""
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from exrl.kernels import api
from exrl.kernels.stats import TokenStats, check_inputs


def _logsumexp_over(x_N, axis):
  m_N = jax.lax.pmax(jax.lax.stop_gradient(x_N), axis)  # any shift is exact; keep it out of autodiff
  return m_N + jnp.log(jax.lax.psum(jnp.exp(x_N - m_N), axis))


def _merge(s, in_shard_N, v_local, n_shards, axis):
  """Shard-local TokenStats -> global dict of [N] stats (inside shard_map)."""
  lse = _logsumexp_over(s.lse, axis)
  log_w = s.lse - lse  # log p(shard)
  w = jnp.exp(log_w)
  out = dict(lse=lse)
  out["logp"] = jax.lax.psum(jnp.where(in_shard_N, s.logp + s.lse, 0.0), axis) - lse
  out["entropy"] = jax.lax.psum(w * (s.entropy - log_w), axis)  # H = Σ_k w_k (H_k − log w_k)
  mean_z = jax.lax.psum(s.lse - s.self_certainty - math.log(v_local), axis) / n_shards
  out["self_certainty"] = lse - mean_z - math.log(v_local * n_shards)
  if s.kl is not None:
    ref_lse = _logsumexp_over(s.ref_lse, axis)
    out["kl"] = jax.lax.psum(w * (s.kl + log_w - (s.ref_lse - ref_lse)), axis)
    out["ref_lse"] = ref_lse
    out["ref_logp"] = jax.lax.psum(jnp.where(in_shard_N, s.ref_logp + s.ref_lse, 0.0), axis) - ref_lse
  return out


def token_stats_vocab_sharded(hidden_NxD, w_DxV, targets_N, *, mesh, ref_hidden_NxD=None, ref_w_DxV=None,
                              temperature=1.0, implementation="auto", axis="tensor", token_axes=None):
  """kernels.token_stats with w (and ref_w) sharded by columns over mesh axis `axis`.

  hidden_NxD, targets_N (and ref_hidden_NxD) are sharded over `token_axes` (None: replicated) and replicated over
  `axis`; V must divide evenly by the axis size. Returns TokenStats of float32[N] sharded like targets.
  """
  check_inputs(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature)
  if axis not in mesh.axis_names:
    raise ValueError(f"mesh has axes {mesh.axis_names}; the vocabulary axis {axis!r} is not one of them")
  n_shards, v = mesh.shape[axis], w_DxV.shape[1]
  if v % n_shards:
    raise ValueError(f"V={v} must be divisible by the size of mesh axis {axis!r} ({n_shards})")
  v_local, has_ref = v // n_shards, ref_hidden_NxD is not None
  token_names = () if token_axes is None else (token_axes,) if isinstance(token_axes, str) else tuple(token_axes)
  checked = (api.default_implementation() if implementation == "auto" else implementation) != "pallas"

  def local(hidden_NxD, w_DxVs, targets_N, *ref):
    # custom_vjp needs each cotangent typed like its input: cast hidden and w to vary over the same mesh axes, so
    # their per-shard cotangents psum back over the axes they were replicated on (the transpose of the cast).
    if checked:
      hidden_NxD = jax.lax.pcast(hidden_NxD, (axis,), to="varying")
      if token_names:
        w_DxVs = jax.lax.pcast(w_DxVs, token_names, to="varying")
    t_local_N = targets_N - jax.lax.axis_index(axis) * v_local
    in_shard_N = (t_local_N >= 0) & (t_local_N < v_local)
    s = api.token_stats(hidden_NxD, w_DxVs, jnp.clip(t_local_N, 0, v_local - 1),
                        ref_hidden_NxD=ref[0] if ref else None, ref_w_DxV=ref[1] if ref else None,
                        temperature=temperature, implementation=implementation)
    return _merge(s, in_shard_N, v_local, n_shards, axis)

  args = [hidden_NxD, w_DxV, targets_N]
  specs = [P(token_axes, None), P(None, axis), P(token_axes)]
  if has_ref:
    args += [jax.lax.stop_gradient(ref_hidden_NxD), jax.lax.stop_gradient(ref_w_DxV)]
    specs += [P(token_axes, None), P(None, axis)]
  out = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=P(token_axes), check_vma=checked)(*args)
  return TokenStats(**out)
