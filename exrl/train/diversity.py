"""ExIt's optional diversity bonus: each trace's advantage is multiplied by the normalised distance of its
embedding from its group's mean embedding, the embedding being the policy's own mean hidden state over
the trace's response tokens (ExIt, arXiv 2509.04575).

  collector = DiversityBonusCollector(GroupCollector(cfg, ...), model_config)

Normalisation: within a group, multiplier_i = d_i / mean_g(d), so a group's multipliers average 1 (the
advantage scale is kept) and an outlying response gets a larger share; a group whose embeddings all
coincide keeps multipliers of 1.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.train.experience import Experience


@functools.partial(jax.jit, static_argnames=("config",))
def response_embedding_sums(config: ModelConfig, params, tokens_RxT, valid_RxT, positions_RxT, mask_RxT):
  """(Σ over masked tokens of the final hidden state float32[R, D], masked token count float32[R])."""
  hidden_RxTxD = decoder.hidden_states(config, params, tokens_RxT, valid_RxT, positions_RxT).astype(jnp.float32)
  m_RxT = mask_RxT.astype(jnp.float32)
  return jnp.einsum("rtd,rt->rd", hidden_RxTxD, m_RxT), jnp.sum(m_RxT, axis=1)


def diversity_multipliers(emb_NxD: np.ndarray, group_N: np.ndarray) -> np.ndarray:
  """float32[N] multipliers d_i / mean_g(d), d_i = ||e_i - mean of i's group||_2 (1 where mean_g(d) = 0)."""
  emb = np.asarray(emb_NxD, np.float64)
  group = np.asarray(group_N)
  out = np.ones(len(group), np.float64)
  for g in np.unique(group):
    idx = np.flatnonzero(group == g)
    d = np.linalg.norm(emb[idx] - emb[idx].mean(0), axis=1)
    if d.mean() > 1e-12:
      out[idx] = d / d.mean()
  return out.astype(np.float32)


class DiversityBonusCollector:
  """Wraps a collector; multiplies each trace's advantage by its diversity multiplier (one extra forward)."""

  def __init__(self, inner, model_config: ModelConfig):
    self.inner, self.model_config = inner, model_config

  def collect(self, params, ref_params, problems, key) -> Experience:
    exp = self.inner.collect(params, ref_params, problems, key)
    r = exp.rows
    sums_RxD, counts_R = jax.device_get(response_embedding_sums(
        self.model_config, params, r["tokens"], r["valid"], r["positions"], r["loss_mask"] > 0))
    trace_R, group_R = np.asarray(r["trace_id"]), np.asarray(r["group_id"])
    traces, inverse = np.unique(trace_R, return_inverse=True)
    # A trace may span rows (chunks): its embedding is the token-weighted mean over all its rows.
    sums = np.zeros((len(traces), sums_RxD.shape[1]))
    np.add.at(sums, inverse, sums_RxD)
    counts = np.bincount(inverse, weights=counts_R, minlength=len(traces))
    emb = sums / np.maximum(counts, 1)[:, None]
    trace_group = np.zeros(len(traces), group_R.dtype)
    trace_group[inverse] = group_R
    mult = diversity_multipliers(emb, trace_group)
    r["adv"] = (np.asarray(r["adv"], np.float32) * mult[inverse]).astype(np.float32)
    exp.metrics["diversity_mult_std"] = float(np.std(mult))
    return exp

  def close(self) -> None:
    self.inner.close()
