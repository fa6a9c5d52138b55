"""The continuous-batching engine against the static sampler (same per-row keys), a fresh forward pass, and a
hand-built length interruption."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.rollout import continuous as cb
from exrl.rollout import engine
from exrl.rollout import sampler

CFG = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, max_position_embeddings=64)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11]]
P, G = 8, 2


@pytest.fixture(scope="module")
def params():
  return decoder.init_params(CFG, jax.random.key(0))


def _stack(res, field):
  return np.stack([getattr(r, field) for rows in res for r in rows])


def _static(params, sampling, keys, budgets):
  tok, val = sampler.pad_prompts(PROMPTS, 0, P)
  return sampler.sample(CFG, params, tok, val, None, sampling, G, keys_B=cb.row_keys(keys, [G] * len(PROMPTS)),
                        budget_B=np.asarray(budgets).reshape(-1))


@pytest.mark.parametrize("kw", [dict(greedy=True), dict(temperature=0.7, top_k=40, stop_token_ids=(5, 7, 11))])
def test_equals_static_sampler(params, kw):
  s = sampler.SamplingConfig(max_new_tokens=20, **kw)
  keys = [jax.random.key(10 + i) for i in range(len(PROMPTS))]
  budgets = [[20, 13], [5, 5], [17, 2], [9, 20]]
  # 3 slots for 8 rows: rows wait in the queue and land in whatever slot frees first, beside other requests.
  res, stats = cb.run(CFG, params, [cb.Request(p, G, b, k) for p, b, k in zip(PROMPTS, budgets, keys)], s, slots=3,
                      prompt_len=P, drain_min_steps=1)
  ref = _static(params, s, keys, budgets)
  np.testing.assert_array_equal(_stack(res, "tokens"), np.asarray(ref.tokens_BxN))
  np.testing.assert_array_equal(_stack(res, "mask"), np.asarray(ref.mask_BxN))
  for field, name in [("logp", "logp_BxN"), ("self_certainty", "self_certainty_BxN"), ("entropy", "entropy_BxN")]:
    np.testing.assert_allclose(_stack(res, field), np.asarray(getattr(ref, name)), atol=2e-5, rtol=1e-5)
  assert stats.prefills == len(PROMPTS)  # one prefill per prompt, shared by its samples (also across refills)
  assert stats.compactions > 0  # rows also ran after being gathered into narrower widths
  assert stats.generated == int(np.asarray(ref.lengths_B).sum())
  if kw.get("greedy"):  # no stop tokens: every row runs to its budget
    np.testing.assert_array_equal(_stack(res, "mask").sum(1), np.asarray(budgets).reshape(-1))


def test_no_compiles_after_warmup_across_length_mixes(params):
  s = sampler.SamplingConfig(max_new_tokens=16, temperature=1.0)
  rng = np.random.default_rng(0)

  def mix(n_req, hi):
    reqs = []
    for _ in range(n_req):
      g = int(rng.integers(1, 4))
      reqs.append(cb.Request(rng.integers(1, 300, rng.integers(1, P + 1)).tolist(), g,
                             rng.integers(1, hi + 1, g).tolist(), jax.random.key(int(rng.integers(1000)))))
    return reqs

  cb.warmup(CFG, params, s, slots=4, prompt_len=P)
  before = dict(cb.TRACE_COUNT)
  jits = (cb._refill_jit, cb._compact_jit, cb._decode_jit, cb._unstack_jit)
  sizes = [f._cache_size() for f in jits]
  for n_req, hi in [(2, 3), (7, 16), (5, 8)]:  # three mixes: short, long-tailed, medium; queue lengths differ
    _, stats = cb.run(CFG, params, mix(n_req, hi), s, slots=4, prompt_len=P)
    assert stats.generated > 0
  assert dict(cb.TRACE_COUNT) == before
  assert [f._cache_size() for f in jits] == sizes


def test_drain_shrinks_the_decode_width(params):
  # Greedy without stop ids: rows run exactly to their budgets, so the schedule is known by hand. 4 slots take the
  # 16-token row and three 1-token rows; after step 1 one row is live: widths 4 -> 2 -> 1, so 1 x 4 + 15 x 1
  # slot-steps for 19 tokens (a fixed width would spend 16 x 4 = 64).
  s = sampler.SamplingConfig(max_new_tokens=16, greedy=True)
  reqs = [cb.Request(PROMPTS[0], 1, 16), cb.Request(PROMPTS[1], 3, 1)]
  res, stats = cb.run(CFG, params, reqs, s, slots=4, prompt_len=P, drain_min_steps=1)
  assert (stats.generated, stats.decode_steps, stats.slot_steps, stats.compactions) == (19, 16, 19, 2)
  assert stats.utilisation == 1.0 and stats.prefills == 2 and stats.refills == 1
  ref = _static(params, s, [jax.random.key(0)] * 4, [[16, 1]] * 4)  # greedy: keys do not matter
  np.testing.assert_array_equal(res[0][0].tokens, np.asarray(ref.tokens_BxN)[0])
  # The default drain_min_steps=16: after step 1 the long row has 15 steps left, too few to pay for a gather,
  # so all 16 steps run at width 4 (the first call stops after step 1, when the rows fit width 2), same tokens.
  res, stats = cb.run(CFG, params, reqs, s, slots=4, prompt_len=P)
  assert (stats.decode_steps, stats.slot_steps, stats.compactions, stats.decode_calls) == (16, 64, 0, 2)
  np.testing.assert_array_equal(res[0][0].tokens, np.asarray(ref.tokens_BxN)[0])


def test_logprobs_equal_fresh_forward_through_the_dispatch(params):
  T = 0.8
  s = sampler.SamplingConfig(max_new_tokens=12, temperature=T, engine="continuous", slots=3)
  tok, val = sampler.pad_prompts(PROMPTS, 0, P)
  out = engine.generate(CFG, params, tok, val, jax.random.key(5), s, G)
  chex.assert_shape([out.tokens_BxN, out.logp_BxN, out.mask_BxN], (len(PROMPTS) * G, 12))
  chex.assert_shape([out.seq_tokens_BxS, out.seq_positions_BxS], (len(PROMPTS) * G, P + 12))
  seq, valid = np.asarray(out.seq_tokens_BxS), np.asarray(out.seq_valid_BxS)
  logits = np.asarray(decoder.logits(CFG, params, jnp.asarray(seq), jnp.asarray(valid)), np.float64) / T
  top = logits.max(-1, keepdims=True)
  logp_all = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  want = np.take_along_axis(logp_all[:, P - 1:-1], seq[:, P:, None], -1)[..., 0]
  mask = np.asarray(out.mask_BxN)
  assert mask.sum() == len(PROMPTS) * G * 12
  np.testing.assert_allclose(np.asarray(out.logp_BxN)[mask], want[mask], atol=2e-4)
  np.testing.assert_array_equal(np.asarray(out.seq_positions_BxS), np.asarray(decoder.default_positions(valid)))
  # slots=0 (the default) is one slot per row; results never depend on the slot count
  every_row = engine.generate(CFG, params, tok, val, jax.random.key(5), dataclasses.replace(s, slots=0), G)
  np.testing.assert_array_equal(np.asarray(every_row.tokens_BxN), np.asarray(out.tokens_BxN))
  np.testing.assert_allclose(np.asarray(every_row.logp_BxN), np.asarray(out.logp_BxN), atol=1e-6)
  with pytest.raises(ValueError, match="slots=-1"):
    dataclasses.replace(s, slots=-1)


def test_length_interruption_hand_built(params):
  base = sampler.SamplingConfig(max_new_tokens=12, greedy=True)
  free, _ = cb.run(CFG, params, [cb.Request(PROMPTS[0], 1), cb.Request(PROMPTS[1], 1)], base, slots=2, prompt_len=P)
  stop = int(free[1][0].tokens[1])  # the second row stops at its token 1 (or earlier), before the thinking budget
  ids = (7, 8, 9)
  s = sampler.SamplingConfig(max_new_tokens=12, greedy=True, stop_token_ids=(stop,), think_budget=4,
                             interrupt_token_ids=ids, answer_budget=3)
  if stop in free[0][0].tokens[:4].tolist():
    pytest.skip("the first row happens to emit the stop id while thinking")
  res, _ = cb.run(CFG, params, [cb.Request(PROMPTS[0], 1), cb.Request(PROMPTS[1], 1)], s, slots=2, prompt_len=P)
  row, short = res[0][0], res[1][0]
  np.testing.assert_array_equal(row.tokens[:4], free[0][0].tokens[:4])  # thinking is untouched
  np.testing.assert_array_equal(row.tokens[4:7], ids)  # the interruption text follows the budget
  np.testing.assert_array_equal(row.mask[:10], [1, 1, 1, 1, 0, 0, 0, 1, 1, 1])  # injected tokens carry no loss
  np.testing.assert_array_equal(row.gen[:10], True)  # ...but are part of the sequence
  assert not row.gen[10:].any() and (row.logp[4:7] == 0).all()  # then at most answer_budget tokens
  assert short.gen.sum() <= 2 and short.mask.sum() == short.gen.sum()  # stopped early: never interrupted
  # The answer is conditioned on the injected text: greedy tokens from a fresh forward of the whole sequence.
  tok, val = sampler.pad_prompts([PROMPTS[0]], 0, P)
  seq = np.concatenate([tok[0], row.tokens[:10]])[None]
  logits = np.asarray(decoder.logits(CFG, params, jnp.asarray(seq), jnp.asarray(seq >= 0) & np.asarray(
      np.concatenate([val[0], np.ones(10, bool)])[None])))
  np.testing.assert_array_equal(logits[0, P + 6:P + 9].argmax(-1), row.tokens[7:10])
  # The static sampler honours the same option identically.
  out = sampler.sample(CFG, params, *sampler.pad_prompts(PROMPTS[:2], 0, P), jax.random.key(0), s)
  np.testing.assert_array_equal(np.asarray(out.tokens_BxN), np.stack([row.tokens, short.tokens]))
  np.testing.assert_array_equal(np.asarray(out.mask_BxN), np.stack([row.mask, short.mask]))
  np.testing.assert_array_equal(np.asarray(out.seq_valid_BxS)[:, P:], np.stack([row.gen, short.gen]))
  with pytest.raises(ValueError, match="interrupt_token_ids is empty"):
    cb.run(CFG, params, [cb.Request([1], 1)], sampler.SamplingConfig(max_new_tokens=12, think_budget=4), slots=1,
           prompt_len=P)
