"""The TokenStats result type and the input checks shared by every implementation."""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


class TokenStats(NamedTuple):
  """Per-token statistics of p = softmax(z), z = (hidden @ w) / temperature; every field is float32[N], in nats.

  logp: log p(target).  lse: logsumexp_j z_j.  entropy: -Σ_j p_j log p_j.
  self_certainty: KL(U ‖ p) = lse − mean_j z_j − log V.
  kl: exact KL(p ‖ p_ref) over the full vocabulary; None without a reference.
  ref_logp, ref_lse: log p_ref(target) and the reference logsumexp (no gradient); None without a reference.
  """
  logp: jax.Array
  lse: jax.Array
  entropy: jax.Array
  self_certainty: jax.Array
  kl: Optional[jax.Array] = None
  ref_logp: Optional[jax.Array] = None
  ref_lse: Optional[jax.Array] = None


LAYOUTS = ("DxV", "VxD")  # how w (and ref_w) are given: [D, V], or [V, D] as a tied head's embedding is stored


def check_inputs(hidden_NxD, w_DxV, targets_N, ref_hidden_NxD=None, ref_w_DxV=None, temperature=1.0, layout="DxV"):
  """Raises ValueError naming the mismatch; checks target range only when targets are concrete (not traced).
  layout "VxD": w and ref_w are [V, D]."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
  if hidden_NxD.ndim != 2 or w_DxV.ndim != 2:
    raise ValueError(f"hidden must be [N, D] and w [{', '.join(layout.split('x'))}]; got hidden {hidden_NxD.shape}, "
                     f"w {w_DxV.shape}")
  dv = (lambda w: w.shape) if layout == "DxV" else (lambda w: w.shape[::-1])  # (D, V) whatever the layout
  n, d = hidden_NxD.shape
  d_w, v = dv(w_DxV)
  if d != d_w:
    raise ValueError(f"hidden has D={d} but w has D={d_w} (w must be [{', '.join(layout.split('x'))}]); got hidden "
                     f"{hidden_NxD.shape}, w {w_DxV.shape}")
  if targets_N.shape != (n,):
    raise ValueError(f"targets must be [N]=({n},) to match hidden {hidden_NxD.shape}; got {targets_N.shape}")
  if not jnp.issubdtype(targets_N.dtype, jnp.integer):
    raise ValueError(f"targets must be integer token ids; got dtype {targets_N.dtype}")
  if not isinstance(targets_N, jax.core.Tracer) and n > 0:
    t = np.asarray(targets_N)
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= v:
      bad = lo if lo < 0 else hi
      raise ValueError(f"targets out of range: found {bad}, valid ids are 0..{v - 1} (V={v})")
  if (ref_hidden_NxD is None) != (ref_w_DxV is None):
    given, missing = ("ref_hidden_NxD", "ref_w_DxV") if ref_w_DxV is None else ("ref_w_DxV", "ref_hidden_NxD")
    raise ValueError(f"{given} was given without {missing}; the KL needs both reference inputs or neither")
  if ref_hidden_NxD is not None:
    if ref_hidden_NxD.ndim != 2 or ref_w_DxV.ndim != 2:
      raise ValueError(f"ref_hidden must be [N, D_ref] and ref_w [D_ref, V]; got {ref_hidden_NxD.shape}, "
                       f"{ref_w_DxV.shape}")
    if ref_hidden_NxD.shape[0] != n:
      raise ValueError(f"ref_hidden has N={ref_hidden_NxD.shape[0]} but hidden has N={n}")
    d_ref, v_ref = dv(ref_w_DxV)
    if ref_hidden_NxD.shape[1] != d_ref:
      raise ValueError(f"ref_hidden has D={ref_hidden_NxD.shape[1]} but ref_w has D={d_ref}")
    if v_ref != v:
      raise ValueError(f"ref_w has V={v_ref} but w has V={v}; both must cover the same vocabulary")
  if not isinstance(temperature, (int, float)) or not temperature > 0:
    raise ValueError(f"temperature must be a positive Python float (static); got {temperature!r}")
