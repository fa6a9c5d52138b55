"""Shared inputs and an independent float64 numpy oracle for the kernels tests."""
import jax
import jax.numpy as jnp
import numpy as np


def make_inputs(seed, n, d, v, *, with_ref=True, dtype=jnp.float32, scale=0.7):
  """Random hidden [N, D], w [D, V], targets [N] and (optionally) a reference pair."""
  k = jax.random.split(jax.random.key(seed), 5)
  h = jax.random.normal(k[0], (n, d)).astype(dtype)
  w = (jax.random.normal(k[1], (d, v)) * scale).astype(dtype)
  t = jax.random.randint(k[2], (n,), 0, v)
  ref = {}
  if with_ref:
    ref = dict(ref_hidden_NxD=jax.random.normal(k[3], (n, d)).astype(dtype),
               ref_w_DxV=(jax.random.normal(k[4], (d, v)) * scale).astype(dtype))
  return h, w, t, ref


def numpy_stats(h, w, t, ref_h=None, ref_w=None, temperature=1.0):
  """float64 stats from definitions: SC = KL(U ‖ p) = Σ_j (1/V) log((1/V)/p_j), KL = Σ_j p_j log(p_j / q_j)."""
  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  z = np.asarray(h, np.float64) @ np.asarray(w, np.float64) / temperature
  v = z.shape[1]
  lp = log_softmax(z)
  p = np.exp(lp)
  out = dict(logp=lp[np.arange(len(t)), np.asarray(t)],
             lse=np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1),
             entropy=-(p * lp).sum(-1),
             self_certainty=((1.0 / v) * (np.log(1.0 / v) - lp)).sum(-1))
  if ref_h is not None:
    lq = log_softmax(np.asarray(ref_h, np.float64) @ np.asarray(ref_w, np.float64) / temperature)
    out["kl"] = (p * (lp - lq)).sum(-1)
    out["ref_logp"] = lq[np.arange(len(t)), np.asarray(t)]
  return out


def weighted_loss(stats, seed=1):
  """A scalar touching every differentiable field with distinct per-token weights."""
  n = stats.logp.shape[0]
  c = jax.random.uniform(jax.random.key(seed), (5, n), minval=-1.0, maxval=1.0)
  total = (jnp.sum(c[0] * stats.logp) + jnp.sum(c[1] * stats.lse) + jnp.sum(c[2] * stats.entropy)
           + jnp.sum(c[3] * stats.self_certainty))
  if stats.kl is not None:
    total = total + jnp.sum(c[4] * stats.kl)
  return total


def stats_and_grads(fn, h, w, t, ref, field=None, **kw):
  """One jitted pass: (TokenStats, (d/dh, d/dw)) of weighted_loss, or of a ramp-weighted sum of a single field."""
  def loss(h, w):
    s = fn(h, w, t, **ref, **kw)
    total = weighted_loss(s) if field is None else jnp.sum(getattr(s, field) * jnp.linspace(-1.0, 1.0, len(t)))
    return total, s
  (_, stats), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h, w)
  return stats, grads
