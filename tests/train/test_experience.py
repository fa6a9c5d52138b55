"""Rollout re-scoring against numpy formulas from the full logits (the shift by one included)."""
import jax
import jax.numpy as jnp
import numpy as np

from exrl.models import decoder
import pytest

from exrl.train.experience import pack_microbatches, score
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


def _rows_for(group_B, trace_B, T=3):
  R = len(group_B)
  return {"tokens": np.arange(R * T, dtype=np.int32).reshape(R, T) + 1, "valid": np.ones((R, T), bool),
          "positions": np.tile(np.arange(T, dtype=np.int32), (R, 1)), "loss_mask": np.ones((R, T), np.float32),
          "old_logp": np.full((R, T), -1.0, np.float32), "ref_logp": np.full((R, T), -2.0, np.float32),
          "adv": np.arange(R, dtype=np.float32), "trace_id": np.asarray(trace_B, np.int32),
          "group_id": np.asarray(group_B, np.int32)}


def test_pack_equal_groups_splits_contiguously():
  rows = _rows_for([0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 2, 3, 4, 5, 6, 7])
  mb = pack_microbatches(rows, 2)
  assert mb["tokens"].shape == (2, 4, 3)
  np.testing.assert_array_equal(mb["adv"], [[0, 1, 2, 3], [4, 5, 6, 7]])
  np.testing.assert_array_equal(mb["trace_id"], [[0, 1, 2, 3], [0, 1, 2, 3]])
  np.testing.assert_array_equal(mb["group_id"], [[0, 0, 1, 1], [0, 0, 1, 1]])


def test_pack_multi_row_traces_keeps_groups_whole_and_pads():
  """Delethink-like rows: group 0 has traces 0 (3 chunks) and 1 (1 chunk); group 1 has traces 2, 3 (1 chunk each);
  group 2 has trace 4 (2 chunks) and 5 (1). Two micro-batches of whole groups, padded to a multiple of 4."""
  group_B = [0, 0, 0, 0, 1, 1, 2, 2, 2]
  trace_B = [0, 0, 0, 1, 2, 3, 4, 4, 5]
  rows = _rows_for(group_B, trace_B)
  mb = pack_microbatches(rows, 2, row_multiple=4)
  assert mb["tokens"].shape == (2, 8, 3)  # 4 rows | 5 rows -> padded to 8 each
  np.testing.assert_array_equal(mb["tokens"][0, :4], rows["tokens"][:4])
  np.testing.assert_array_equal(mb["tokens"][1, :5], rows["tokens"][4:])
  np.testing.assert_array_equal(mb["trace_id"][0], [0, 0, 0, 1, 4, 5, 6, 7])  # padding rows: ids of their own
  np.testing.assert_array_equal(mb["trace_id"][1], [0, 1, 2, 2, 3, 5, 6, 7])
  np.testing.assert_array_equal(mb["group_id"][1, :5], [0, 0, 1, 1, 1])
  for m, n in ((0, 4), (1, 5)):  # padding carries no loss and no valid token
    assert not mb["valid"][m, n:].any() and not mb["loss_mask"][m, n:].any() and not mb["adv"][m, n:].any()


def test_pack_rejects_split_groups_and_too_many_microbatches():
  with pytest.raises(ValueError, match="contiguous"):
    pack_microbatches(_rows_for([0, 1, 0], [0, 1, 2]), 1)
  with pytest.raises(ValueError, match="num_microbatches=3 must be in \\[1, 2\\]"):
    pack_microbatches(_rows_for([0, 0, 1, 1], [0, 1, 2, 3]), 3)


def test_sampler_stats_equal_rescoring_at_the_sampling_temperature():
  """Sampling at T=0.7: the sampler's log-probs and self-certainty equal the re-scoring pass's at T=0.7,
  which is what lets one inner epoch skip that pass."""
  from exrl.rollout.sampler import SamplingConfig, pad_prompts, sample
  params = decoder.init_params(CFG, jax.random.key(0))
  params = jax.tree.map(lambda x: x * 8.0 if x.ndim == 2 else x, params)  # peaked: T visibly matters
  tokens, valid = pad_prompts([[3, 5, 7], [9] * 6, [11, 2]], pad_id=0)
  out = sample(CFG, params, tokens, valid, jax.random.key(2), SamplingConfig(max_new_tokens=6, temperature=0.7))
  response = jnp.concatenate([jnp.zeros_like(jnp.asarray(valid)), out.mask_BxN], axis=1)
  for T, close in ((0.7, True), (1.0, False)):
    s = score(CFG, params, params, out.seq_tokens_BxS, out.seq_valid_BxS, out.seq_positions_BxS, response,
              with_ref=False, temperature=T)
    mask = np.asarray(out.mask_BxN)
    got, want = np.asarray(s["logp"])[:, tokens.shape[1]:][mask], np.asarray(out.logp_BxN)[mask]
    assert np.allclose(got, want, atol=2e-5) == close, np.abs(got - want).max()
    sc_sampler = (np.asarray(out.self_certainty_BxN) * mask).sum(1) / mask.sum(1)
    assert np.allclose(np.asarray(s["sc_B"]), sc_sampler, atol=2e-5) == close
