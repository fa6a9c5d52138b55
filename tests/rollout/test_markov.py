"""Delethink chunked sampling: chunk prompts as specified, chunk 1 == the plain sampler, old log-probs ==
a fresh forward over each chunk's context, a constant-size cache, and bad configs named."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.rollout import markov, sampler
from exrl.rollout.markov import MarkovConfig
from exrl.rollout.sampler import SamplingConfig

CONFIG = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0)
PROMPTS = [[5, 17, 3, 9, 44], [7] * 9, [250, 11, 4], [i + 20 for i in range(12)], [8, 8], [100, 101, 102]]
MK = MarkovConfig(chunk_size=12, carryover=6, head=2, max_chunks=4)
STOPPING = SamplingConfig(max_new_tokens=12, temperature=0.7, stop_token_ids=(3, 4, 5, 6, 7, 8, 9, 10))
ENDLESS = SamplingConfig(max_new_tokens=12, temperature=1.0)


@pytest.fixture(scope="module")
def params():
  rng = np.random.default_rng(0)
  shapes = decoder.param_shapes(CONFIG)
  return jax.tree.map(lambda shape: jnp.asarray(rng.normal(0, 0.3, shape), jnp.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def _query():
  tokens, valid = sampler.pad_prompts(PROMPTS, pad_id=0)
  return jnp.asarray(tokens), jnp.asarray(valid)


def test_carryover_hand_built():
  # Response region of a finished chunk, head kept from chunk 1, m = 5: head ⊕ last 3.
  region = jnp.asarray([[11, 12, 13, 14, 15, 16, 17, 18]])
  head = jnp.asarray([[11, 12]])
  np.testing.assert_array_equal(markov.carryover(region, head, 5), [[11, 12, 16, 17, 18]])
  np.testing.assert_array_equal(markov.carryover(region, head[:, :0], 3), [[16, 17, 18]])  # h = 0


def test_chunk_prompts_are_query_head_and_tail(params):
  tokens, valid = _query()
  out = markov.markov_sample(CONFIG, params, tokens, valid, jax.random.key(3), ENDLESS, MK)
  np.testing.assert_array_equal(out.num_chunks_B, MK.max_chunks)  # no stop tokens: every trace runs out
  np.testing.assert_array_equal(out.lengths_B, MK.budget)
  assert MK.budget == 12 + 3 * 6
  for q, segs in zip(PROMPTS, markov.segments(out)):
    so_far = []
    for k, seg in enumerate(segs):
      expect = q if k == 0 else q + so_far[:MK.head] + so_far[-(MK.carryover - MK.head):]
      assert seg["prompt"] == expect, (k, seg["prompt"], expect)
      assert len(seg["generated"]) == (MK.chunk_size if k == 0 else MK.chunk_size - MK.carryover)
      so_far += seg["generated"]
  assert markov.response_tokens(out) == [sum((s["generated"] for s in segs), []) for segs in markov.segments(out)]


def test_chunk_examples_rebuild_the_sampler_chunks(params):
  # Host-side chunking of a finished trace (the SFT rows of a Markovian base) == what the sampler fed each chunk.
  tokens, valid = _query()
  out = markov.markov_sample(CONFIG, params, tokens, valid, jax.random.key(5), ENDLESS, MK)
  for q, resp, segs in zip(PROMPTS, markov.response_tokens(out), markov.segments(out)):
    rows = markov.chunk_examples(q, resp, MK)
    assert len(rows) == len(segs) == MK.max_chunks
    for (ids, mask), seg in zip(rows, segs):
      assert ids == seg["prompt"] + seg["generated"]
      assert mask == [0.0] * len(seg["prompt"]) + [1.0] * len(seg["generated"])
  # A trace longer than max_chunks still yields every chunk; the last one is short and ends the trace.
  rows = markov.chunk_examples([1, 2], list(range(10, 45)), MK)  # 35 tokens: 12, then 6 per chunk
  assert len(rows) == 1 + 4
  assert rows[-1][0] == [1, 2, 10, 11] + list(range(36, 40)) + list(range(40, 45))
  assert sum(sum(m) for _, m in rows) == 35


def test_chunk_one_equals_plain_sampler(params):
  tokens, valid = _query()
  key = jax.random.key(7)
  out = markov.markov_sample(CONFIG, params, tokens, valid, key, STOPPING, MK)
  plain = sampler.sample(CONFIG, params, tokens, valid, key, STOPPING)  # max_new_tokens = C
  P = tokens.shape[1]
  ended_in_one = np.asarray(out.num_chunks_B == 1) & np.asarray(out.stopped_B)
  assert ended_in_one.any() and (~ended_in_one).any(), np.asarray(out.num_chunks_B)  # both kinds present
  # Chunk 1 is the plain sampler's computation, for every trace.
  np.testing.assert_array_equal(out.tokens_BxIxS[:, 0, P:], plain.tokens_BxN)
  np.testing.assert_array_equal(out.response_BxIxS[:, 0, P:], plain.mask_BxN)
  np.testing.assert_array_equal(out.logp_BxIxS[:, 0, P:], plain.logp_BxN)
  # A trace that ends in chunk 1 is exactly the plain trace, and has nothing after it.
  resp = markov.response_tokens(out)
  for b in np.flatnonzero(ended_in_one):
    assert resp[b] == np.asarray(plain.tokens_BxN[b])[np.asarray(plain.mask_BxN[b])].tolist()
    assert not np.asarray(out.valid_BxIxS[b, 1:]).any()


def test_old_logp_matches_fresh_forward_over_each_chunk(params):
  tokens, valid = _query()
  out = markov.markov_sample(CONFIG, params, tokens, valid, jax.random.key(11), STOPPING, MK)
  B, I, S = out.tokens_BxIxS.shape
  flat = lambda x: jnp.reshape(x, (B * I, S))
  z = np.asarray(decoder.logits(CONFIG, params, flat(out.tokens_BxIxS), flat(out.valid_BxIxS),
                                flat(out.positions_BxIxS)), np.float64) / STOPPING.temperature
  lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
  tok = np.asarray(flat(out.tokens_BxIxS))
  fresh = np.take_along_axis(z[:, :-1], tok[:, 1:, None], -1)[..., 0] - lse[:, :-1]  # slot s predicts s+1
  resp = np.asarray(flat(out.response_BxIxS))[:, 1:]
  assert resp.sum() > 3 * B  # several chunks ran
  np.testing.assert_allclose(np.asarray(flat(out.logp_BxIxS))[:, 1:][resp], fresh[resp], atol=2e-5)
  chex.assert_trees_all_equal(np.asarray(flat(out.logp_BxIxS))[:, 1:][~resp], 0.0 * fresh[~resp])


def test_kv_cache_is_bounded_by_one_chunk(params):
  tokens, valid = _query()
  long_mk = MarkovConfig(chunk_size=12, carryover=6, head=2, max_chunks=9)
  B, P = tokens.shape
  assert markov.kv_cache_bytes(CONFIG, B, P + MK.chunk_size) == markov.kv_cache_bytes(CONFIG, B, P + 12)
  # No key/value array of the chunked sampler has more than P + C slots, for a budget of P + 60 tokens.
  jaxpr = jax.make_jaxpr(lambda p, t, v, k: markov.generate_markov(CONFIG, ENDLESS, long_mk, p, t, v, k))(
      params, tokens, valid, jax.random.key(0))
  kv_shape = lambda s: len(s) == 4 and s[0] == B and s[1] == CONFIG.num_kv_heads and s[3] == CONFIG.head_dim
  slot_dims = {v.aval.shape[2] for eq in jaxpr.eqns for v in eq.outvars
               if hasattr(v.aval, "shape") and kv_shape(v.aval.shape)}
  assert max(slot_dims) == P + MK.chunk_size, slot_dims
  assert long_mk.budget == 60


def test_finished_rows_stay_finished(params):
  tokens, valid = _query()
  out = markov.markov_sample(CONFIG, params, tokens, valid, jax.random.key(5), STOPPING, MK)
  n = np.asarray(out.num_chunks_B)
  for b in range(len(PROMPTS)):
    assert np.asarray(out.valid_BxIxS[b, :n[b]]).any(-1).all()
    assert not np.asarray(out.valid_BxIxS[b, n[b]:]).any()
    if out.stopped_B[b]:
      last = markov.response_tokens(out)[b][-1]
      assert last in STOPPING.stop_token_ids


def test_for_budget():
  assert MarkovConfig.for_budget(30, 12, 6, 2) == MarkovConfig(12, 6, 2, 4)
  assert MarkovConfig.for_budget(31, 12, 6, 2).budget >= 31
  assert MarkovConfig.for_budget(5, 12, 6, 2).max_chunks == 1


@pytest.mark.parametrize("kwargs, field", [
    (dict(chunk_size=8, carryover=8), "chunk_size=8 must be > carryover=8"),
    (dict(chunk_size=8, carryover=10), "chunk_size=8 must be > carryover=10"),
    (dict(max_chunks=0), "max_chunks=0"),
    (dict(carryover=0), "carryover=0"),
    (dict(head=30), "head=30"),
])
def test_bad_config_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    MarkovConfig(**kwargs)


def test_chunk_that_cannot_fit_positions_fails_fast(params):
  tokens, valid = _query()
  too_big = MarkovConfig(chunk_size=60, carryover=30, head=2, max_chunks=2)  # 12-token query + 60 > 64
  with pytest.raises(ValueError, match="chunk_size=60 .* max_position_embeddings=64"):
    markov.markov_sample(CONFIG, params, tokens, valid, jax.random.key(0), ENDLESS, too_big)
