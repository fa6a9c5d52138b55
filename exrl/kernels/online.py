"""Streaming (online-logsumexp) math over vocabulary blocks, shared by the XLA and Pallas implementations.

Per-token quantities are kept as [N, 1] columns so the same code runs on whole arrays (XLA) and on VMEM tiles (Pallas).
State after blocks seen so far, with m the running max of z:
  s = Σ e^(z−m),  u = Σ e^(z−m)(z−m),  zsum = Σ z,  zt = z_target,
  and with a reference: mr, sr (its online lse), v = Σ e^(z−m)(z − z_ref), zrt = z_ref,target.
"""
import math
from typing import NamedTuple, Optional

import jax.numpy as jnp


class State(NamedTuple):
  m: jnp.ndarray
  s: jnp.ndarray
  u: jnp.ndarray
  zsum: jnp.ndarray
  zt: jnp.ndarray
  mr: Optional[jnp.ndarray] = None
  sr: Optional[jnp.ndarray] = None
  v: Optional[jnp.ndarray] = None
  zrt: Optional[jnp.ndarray] = None


def init(n, with_ref):
  """Empty state for n tokens; the max starts at -inf and is rescaled away by the first block."""
  zeros = jnp.zeros((n, 1), jnp.float32)
  neg = jnp.full((n, 1), -jnp.inf, jnp.float32)
  if with_ref:
    return State(neg, zeros, zeros, zeros, zeros, neg, zeros, zeros, zeros)
  return State(neg, zeros, zeros, zeros, zeros)


def update(state, z_NxB, zr_NxB, valid_NxB, hit_NxB):
  """Folds one block of logits in. valid masks padded/duplicate columns; hit marks the target column."""
  z_max = jnp.max(jnp.where(valid_NxB, z_NxB, -jnp.inf), axis=-1, keepdims=True)
  m = jnp.maximum(state.m, z_max)
  a = jnp.exp(state.m - m)  # rescales the old sums to the new max
  zc_NxB = jnp.where(valid_NxB, z_NxB - m, 0.0)  # masked columns may hold NaN padding: never let it through
  e_NxB = jnp.where(valid_NxB, jnp.exp(zc_NxB), 0.0)
  s = a * state.s + jnp.sum(e_NxB, axis=-1, keepdims=True)
  dm = jnp.where(state.s > 0, state.m - m, 0.0)  # avoids (-inf) * 0 on the first block
  u = a * (state.u + dm * state.s) + jnp.sum(e_NxB * zc_NxB, axis=-1, keepdims=True)
  zsum = state.zsum + jnp.sum(jnp.where(valid_NxB, z_NxB, 0.0), axis=-1, keepdims=True)
  zt = state.zt + jnp.sum(jnp.where(hit_NxB, z_NxB, 0.0), axis=-1, keepdims=True)
  if zr_NxB is None:
    return State(m, s, u, zsum, zt)
  zr_max = jnp.max(jnp.where(valid_NxB, zr_NxB, -jnp.inf), axis=-1, keepdims=True)
  mr = jnp.maximum(state.mr, zr_max)
  sr = jnp.exp(state.mr - mr) * state.sr + jnp.sum(
      jnp.where(valid_NxB, jnp.exp(jnp.where(valid_NxB, zr_NxB - mr, 0.0)), 0.0), axis=-1, keepdims=True)
  v = a * state.v + jnp.sum(e_NxB * jnp.where(valid_NxB, z_NxB - zr_NxB, 0.0), axis=-1, keepdims=True)
  zrt = state.zrt + jnp.sum(jnp.where(hit_NxB, zr_NxB, 0.0), axis=-1, keepdims=True)
  return State(m, s, u, zsum, zt, mr, sr, v, zrt)


def finalize(state, vocab_size):
  """State -> dict of [N, 1] stats: logp, lse, entropy, self_certainty and (with a reference) kl, ref_logp, ref_lse."""
  lse = state.m + jnp.log(state.s)
  out = dict(logp=state.zt - lse, lse=lse, entropy=jnp.log(state.s) - state.u / state.s,
             self_certainty=lse - state.zsum / vocab_size - math.log(vocab_size))
  if state.mr is not None:
    ref_lse = state.mr + jnp.log(state.sr)
    out.update(kl=state.v / state.s - lse + ref_lse, ref_logp=state.zrt - ref_lse, ref_lse=ref_lse)
  return out


def grad_coefs(lse, entropy, kl, ref_lse, g_logp, g_lse, g_entropy, g_sc, g_kl, vocab_size):
  """Per-token [N, 1] coefficients so that d(loss)/dz_j = p_j (alpha + beta lp_j + gamma lpr_j) + g_logp [j=t] − c.

  lp_j = z_j − lse and lpr_j = z_ref,j − ref_lse. From: dlogp = [j=t] − p, dlse = p, dH = −p (lp + H),
  dSC = p − 1/V, dKL = p (lp − lpr − KL).
  """
  alpha = -g_logp + g_lse + g_sc - g_entropy * entropy
  beta = -g_entropy
  gamma = jnp.zeros_like(alpha)
  if kl is not None:
    alpha = alpha - g_kl * kl
    beta = beta + g_kl
    gamma = -g_kl
  return dict(lse=lse, ref_lse=ref_lse if ref_lse is not None else jnp.zeros_like(lse), alpha=alpha, beta=beta,
              gamma=gamma, g_logp=g_logp, c=g_sc / vocab_size)


def dz_block(z_NxB, zr_NxB, valid_NxB, hit_NxB, coefs):
  """d(loss)/dz for one block, zero on masked columns."""
  lp_NxB = jnp.where(valid_NxB, z_NxB - coefs["lse"], 0.0)
  mult_NxB = coefs["alpha"] + coefs["beta"] * lp_NxB
  if zr_NxB is not None:
    mult_NxB = mult_NxB + coefs["gamma"] * jnp.where(valid_NxB, zr_NxB - coefs["ref_lse"], 0.0)
  dz_NxB = jnp.exp(lp_NxB) * mult_NxB + jnp.where(hit_NxB, coefs["g_logp"], 0.0) - coefs["c"]
  return jnp.where(valid_NxB, dz_NxB, 0.0)
