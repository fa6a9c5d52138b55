"""Reference token statistics: materialises the [N, V] logits. Plain, obviously correct, and the oracle for the rest."""
import math

import jax
import jax.numpy as jnp

from exrl.kernels.stats import TokenStats, check_inputs


def logits(hidden_NxD, w_DxV, temperature, layout="DxV"):
  """float32[N, V] logits z = (hidden @ w) / temperature with fp32 accumulation (w [V, D] for layout "VxD")."""
  spec = "nd,dv->nv" if layout == "DxV" else "nd,vd->nv"
  return jnp.einsum(spec, hidden_NxD, w_DxV, preferred_element_type=jnp.float32) / temperature


def token_stats(hidden_NxD, w_DxV, targets_N, *, ref_hidden_NxD=None, ref_w_DxV=None, temperature=1.0,
                layout="DxV"):
  """TokenStats from full logits; gradients by plain autodiff, reference inputs stop-gradient."""
  check_inputs(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD, ref_w_DxV, temperature, layout)
  z_NxV = logits(hidden_NxD, w_DxV, temperature, layout)
  v = z_NxV.shape[-1]
  lse_N = jax.nn.logsumexp(z_NxV, axis=-1)
  logp_NxV = z_NxV - lse_N[:, None]
  p_NxV = jnp.exp(logp_NxV)
  logp_N = jnp.take_along_axis(logp_NxV, targets_N[:, None].astype(jnp.int32), axis=-1)[:, 0]
  entropy_N = -jnp.sum(p_NxV * logp_NxV, axis=-1)
  self_certainty_N = lse_N - jnp.mean(z_NxV, axis=-1) - math.log(v)
  kl_N = ref_logp_N = ref_lse_N = None
  if ref_hidden_NxD is not None:
    zr_NxV = logits(jax.lax.stop_gradient(ref_hidden_NxD), jax.lax.stop_gradient(ref_w_DxV), temperature, layout)
    ref_lse_N = jax.nn.logsumexp(zr_NxV, axis=-1)
    ref_logp_NxV = zr_NxV - ref_lse_N[:, None]
    kl_N = jnp.sum(p_NxV * (logp_NxV - ref_logp_NxV), axis=-1)
    ref_logp_N = jnp.take_along_axis(ref_logp_NxV, targets_N[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return TokenStats(logp_N, lse_N, entropy_N, self_certainty_N, kl_N, ref_logp_N, ref_lse_N)
