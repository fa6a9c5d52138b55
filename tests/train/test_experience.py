"""Rollout re-scoring against numpy formulas from the full logits (the shift by one included)."""
import jax
import jax.numpy as jnp
import numpy as np

from exrl.models import decoder
from exrl.train.experience import score
from tests.train.test_step import CFG, _rows


def _np_stats(params, rows):
  z = np.asarray(decoder.logits(CFG, params, jnp.asarray(rows["tokens"]), jnp.asarray(rows["valid"]),
                                jnp.asarray(rows["positions"])), np.float64)
  m = z.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
  sc = lse - z.mean(-1) - np.log(CFG.vocab_size)  # KL(U || p) per position
  logp = np.take_along_axis(z[:, :-1], rows["tokens"][:, 1:, None], -1)[..., 0] - lse[:, :-1]
  resp = rows["loss_mask"][:, 1:]
  # Position t-1's distribution scores response token t.
  sc_B = (sc[:, :-1] * resp).sum(1) / resp.sum(1)
  return logp * resp, sc_B


def test_score_matches_numpy_self_certainty_and_logp():
  rows = _rows()
  policy = decoder.init_params(CFG, jax.random.key(0))
  ref = decoder.init_params(CFG, jax.random.key(1))
  out = score(CFG, policy, ref, jnp.asarray(rows["tokens"]), jnp.asarray(rows["valid"]), jnp.asarray(rows["positions"]),
              jnp.asarray(rows["loss_mask"]), with_ref=True)
  logp, sc_B = _np_stats(policy, rows)
  ref_logp, ref_sc_B = _np_stats(ref, rows)
  np.testing.assert_allclose(out["sc_B"], sc_B, rtol=1e-5, atol=1e-6)  # lse - mean - log V cancels
  np.testing.assert_allclose(out["logp"][:, 1:], logp, atol=1e-5)
  np.testing.assert_allclose(out["ref_sc_B"], ref_sc_B, rtol=1e-5, atol=1e-6)  # the offline annotator
  np.testing.assert_allclose(out["ref_logp"][:, 1:], ref_logp, atol=1e-5)
  assert not np.allclose(sc_B, ref_sc_B)
