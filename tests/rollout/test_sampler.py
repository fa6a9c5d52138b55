"""Sampler tests: log-probs vs a fresh no-cache forward pass, stops, top-k/top-p draws vs numpy, keys, compiles."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.rollout import sampler
from exrl.rollout.sampler import SamplingConfig

CONFIG = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0)
PROMPTS = [[5, 17, 3, 9, 44], [7] * 9, [250, 11, 4], [i + 20 for i in range(12)]]


N = 12
GREEDY = SamplingConfig(max_new_tokens=N, greedy=True)
TEMPERED = SamplingConfig(max_new_tokens=N, temperature=0.7, stop_token_ids=(3, 4, 5))
_logits = jax.jit(decoder.logits, static_argnums=0)


@pytest.fixture(scope="module")
def params():
  # std 0.3 gives peaked next-token distributions, so temperature visibly changes log-probs.
  rng = np.random.default_rng(0)
  shapes = decoder.param_shapes(CONFIG)
  return jax.tree.map(lambda shape: jnp.asarray(rng.normal(0, 0.3, shape), jnp.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def _batch(bucket=16):
  tokens, valid = sampler.pad_prompts(PROMPTS, pad_id=0, bucket=bucket)
  return jnp.asarray(tokens), jnp.asarray(valid)


def _fresh_logp(params, out, temperature=1.0):
  """Temperature-1 log-probs of every completion token from a no-cache forward over prompt+completion."""
  logits_BxSxV = _logits(CONFIG, params, out.seq_tokens_BxS, out.seq_valid_BxS, out.seq_positions_BxS)
  logp_BxSxV = jax.nn.log_softmax(logits_BxSxV / temperature, axis=-1)
  pred_BxNxV = logp_BxSxV[:, -N - 1:-1]  # slot s predicts token s+1
  return np.asarray(jnp.take_along_axis(pred_BxNxV, out.tokens_BxN[..., None], -1)[..., 0]), logits_BxSxV


def test_pad_prompts_left_pads_to_bucket():
  tokens, valid = sampler.pad_prompts([[1, 2, 3], [4]], pad_id=9, bucket=8)
  np.testing.assert_array_equal(tokens, [[9] * 5 + [1, 2, 3], [9] * 7 + [4]])
  np.testing.assert_array_equal(valid, np.array(tokens) != 9)
  assert sampler.pad_prompts([[1] * 17], 0, bucket="pow2")[0].shape == (1, 32)
  assert sampler.pad_prompts([[1] * 16], 0, bucket=16)[0].shape == (1, 16)


@pytest.mark.parametrize("layer_loop", ["unroll", "scan"])
def test_logprobs_match_fresh_forward(params, layer_loop):
  tokens, valid = _batch()
  out = sampler.sample(CONFIG, params, tokens, valid, jax.random.key(1),
                       dataclasses.replace(TEMPERED, layer_loop=layer_loop))
  B = len(PROMPTS)
  chex.assert_shape([out.tokens_BxN, out.mask_BxN, out.logp_BxN], (B, N))
  chex.assert_shape([out.seq_tokens_BxS, out.seq_valid_BxS, out.seq_positions_BxS], (B, 16 + N))
  chex.assert_tree_all_finite(out.logp_BxN)
  mask = np.asarray(out.mask_BxN)
  assert mask.sum() > 2 * B, "need a few generated tokens per row"
  # Positions: each row's prompt is 0..len-1 and completion token t sits at len + t.
  lens = np.array([len(p) for p in PROMPTS])
  np.testing.assert_array_equal(np.asarray(out.seq_positions_BxS)[:, 16:][mask], (lens[:, None] + np.arange(N))[mask])
  # Log-probs are at the sampling temperature (0.7), as TRL and verl compute the PPO ratio.
  fresh, logits_BxSxV = _fresh_logp(params, out, temperature=0.7)
  np.testing.assert_allclose(np.asarray(out.logp_BxN)[mask], fresh[mask], atol=2e-5)
  assert (np.asarray(out.logp_BxN)[~mask] == 0).all()
  # The test can tell 0.7 from temperature 1: the untempered log-probs are far off.
  untempered, _ = _fresh_logp(params, out, temperature=1.0)
  assert np.abs(untempered - fresh)[mask].max() > 0.05
  # Self-certainty KL(U || p) and entropy of the distribution each token was drawn from, vs numpy.
  z = np.asarray(logits_BxSxV[:, -N - 1:-1], np.float64) / 0.7
  lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
  p = np.exp(z - lse[..., None])
  sc = lse - z.mean(-1) - np.log(CONFIG.vocab_size)
  ent = -(p * np.log(p)).sum(-1)
  np.testing.assert_allclose(np.asarray(out.self_certainty_BxN)[mask], sc[mask], atol=5e-5)
  np.testing.assert_allclose(np.asarray(out.entropy_BxN)[mask], ent[mask], atol=5e-5)
  assert (np.asarray(out.self_certainty_BxN)[~mask] == 0).all() and (np.asarray(out.entropy_BxN)[~mask] == 0).all()


def test_eos_stops_a_row_and_masks_what_follows(params):
  tokens, valid = _batch()
  free = sampler.sample(CONFIG, params, tokens, valid, jax.random.key(0), GREEDY)
  free_tok = np.asarray(free.tokens_BxN)
  assert np.asarray(free.mask_BxN).all()
  stop = int(free_tok[0, 3])  # a token row 0 emits at step >= 3 (first occurrence below)
  out = sampler.sample(CONFIG, params, tokens, valid, jax.random.key(0),
                       SamplingConfig(max_new_tokens=N, greedy=True, stop_token_ids=(stop,), pad_id=0))
  got_tok, got_mask, got_logp = map(np.asarray, (out.tokens_BxN, out.mask_BxN, out.logp_BxN))
  for b in range(len(PROMPTS)):
    hits = np.flatnonzero(free_tok[b] == stop)
    n = hits[0] + 1 if len(hits) else N  # oracle: cut after the first stop token, inclusive
    np.testing.assert_array_equal(got_mask[b], np.arange(N) < n)
    np.testing.assert_array_equal(got_tok[b, :n], free_tok[b, :n])
    assert (got_tok[b, n:] == 0).all() and (got_logp[b, n:] == 0).all()
    assert int(out.lengths_B[b]) == n
  assert got_mask[0].sum() <= 4 and not got_mask[0, -1]
  np.testing.assert_array_equal(np.asarray(out.seq_valid_BxS)[:, 16:], got_mask)


def test_top_k_1_equals_greedy(params):
  tokens, valid = _batch()
  greedy = sampler.sample(CONFIG, params, tokens, valid, jax.random.key(0), GREEDY)
  top1 = sampler.sample(CONFIG, params, tokens, valid, jax.random.key(7),
                        SamplingConfig(max_new_tokens=N, temperature=0.7, top_k=1))
  chex.assert_trees_all_equal(top1.tokens_BxN, greedy.tokens_BxN)
  # Log-probs are of the full distribution at the sampling temperature, not of the top-k cut.
  np.testing.assert_allclose(top1.logp_BxN, _fresh_logp(params, top1, temperature=0.7)[0], atol=2e-5)
  # Greedy is the argmax of a fresh forward pass at each step.
  _, logits_BxSxV = _fresh_logp(params, greedy)
  np.testing.assert_array_equal(np.argmax(np.asarray(logits_BxSxV[:, -N - 1:-1]), -1), np.asarray(greedy.tokens_BxN))


@pytest.mark.parametrize("s", [SamplingConfig(max_new_tokens=N),
                               SamplingConfig(max_new_tokens=N, top_k=20, top_p=0.95, temperature=1.3)])
def test_same_key_same_tokens(params, s):
  tokens, valid = _batch()
  a = sampler.sample(CONFIG, params, tokens, valid, jax.random.key(3), s)
  b = sampler.sample(CONFIG, params, tokens, valid, jax.random.key(3), s)
  c = sampler.sample(CONFIG, params, tokens, valid, jax.random.key(4), s)
  chex.assert_trees_all_equal(a, b)
  assert (np.asarray(a.tokens_BxN) != np.asarray(c.tokens_BxN)).any()


def _numpy_probs(logits, temperature, top_k, top_p):
  """Oracle: HF-style warpers (temperature, then top-k, then top-p) in plain numpy."""
  z = logits / temperature
  order = np.argsort(-z, kind="stable")
  keep = np.zeros_like(z, bool)
  k = top_k or len(z)
  p = np.exp(z[order[:k]] - z[order[0]])
  p /= p.sum()
  mass_before = np.cumsum(p) - p
  keep[order[:k][mass_before < top_p]] = True
  probs = np.where(keep, np.exp(z - z.max()), 0)
  return probs / probs.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (0.8, 0, 0.6),
                                                     (1.2, 40, 0.9)])
def test_draws_follow_the_warped_distribution(temperature, top_k, top_p):
  V, n = 300, 24000  # V > the 128-wide CDF chunk and not a multiple of it
  logits = np.random.default_rng(0).normal(0, 1.5, V).astype(np.float32)
  s = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
  keys = jax.random.split(jax.random.key(0), n // 8)
  tok, logp = jax.vmap(lambda k: sampler.choose_tokens(jnp.broadcast_to(logits, (8, V)), k, s))(keys)
  tok, logp = np.asarray(tok).ravel(), np.asarray(logp).ravel()
  want = _numpy_probs(logits.astype(np.float64), temperature, top_k, top_p)
  freq = np.bincount(tok, minlength=V) / n
  assert freq[want == 0].sum() == 0
  assert np.abs(freq - want).max() < 4 * np.sqrt(want.max() / n)
  z = logits.astype(np.float64) / temperature  # log-probs at the sampling temperature, before the cut
  log_softmax = z - np.log(np.exp(z - z.max()).sum()) - z.max()
  np.testing.assert_allclose(logp, log_softmax[tok], atol=1e-5)


def test_compiles_once_per_shape_bucket(params):
  s = TEMPERED
  tokens, valid = _batch()
  sampler.sample(CONFIG, params, tokens, valid, jax.random.key(0), s)
  traces = sampler.TRACE_COUNT[0]
  # Different key and different prompts of the same bucket: no new trace.
  t2, v2 = sampler.pad_prompts([[1, 2], [3] * 14, [4], [5, 6, 7]], pad_id=0, bucket=16)
  sampler.sample(CONFIG, params, t2, v2, jax.random.key(1), s)
  assert sampler.TRACE_COUNT[0] == traces
  # A new length bucket is a new compile.
  t3, v3 = sampler.pad_prompts(PROMPTS, pad_id=0, bucket=32)
  sampler.sample(CONFIG, params, t3, v3, jax.random.key(1), s)
  assert sampler.TRACE_COUNT[0] == traces + 1


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors(params):
  tokens, valid = _batch()
  key = jax.random.key(0)
  long_tokens, long_valid = sampler.pad_prompts([[1] * 70], pad_id=0, bucket=16)
  with pytest.raises(ValueError, match=r"70 tokens.*max_position_embeddings=64"):
    sampler.sample(CONFIG, params, long_tokens, long_valid, key, SamplingConfig(max_new_tokens=4))
  with pytest.raises(ValueError, match=r"12 tokens \+ max_new_tokens=60 = 72 exceeds max_position_embeddings=64"):
    sampler.sample(CONFIG, params, tokens, valid, key, SamplingConfig(max_new_tokens=60))
  with pytest.raises(ValueError, match="empty batch"):
    sampler.sample(CONFIG, params, np.zeros((0, 16), np.int32), np.zeros((0, 16), bool), key)
  with pytest.raises(ValueError, match="LEFT-padded"):
    sampler.sample(CONFIG, params, tokens[:, ::-1], valid[:, ::-1], key)
  with pytest.raises(ValueError, match=r"rows \[1\] have no valid tokens"):
    sampler.sample(CONFIG, params, tokens, valid.at[1].set(False), key)
  with pytest.raises(ValueError, match=r"top_k=301 exceeds vocab_size=300"):
    sampler.sample(CONFIG, params, tokens, valid, key, SamplingConfig(top_k=301))
  with pytest.raises(ValueError, match=r"token ids must be in \[0, 300\)"):
    sampler.sample(CONFIG, params, tokens.at[0, -1].set(300), valid, key, SamplingConfig(max_new_tokens=4))
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    sampler.pad_prompts([[1], []], pad_id=0)
  with pytest.raises(ValueError, match="empty list"):
    sampler.pad_prompts([], pad_id=0)
  for bad, pattern in [(dict(top_p=0.0), r"top_p=0.0.*\(0, 1\]"), (dict(top_p=1.5), r"top_p=1.5"),
                       (dict(temperature=0.0), r"temperature=0.0.*greedy=True"), (dict(top_k=-1), "top_k=-1"),
                       (dict(max_new_tokens=0), "max_new_tokens=0"),
                       (dict(head_dtype="float16"), r"head_dtype='float16'.*'bfloat16'")]:
    with pytest.raises(ValueError, match=pattern):
      SamplingConfig(**bad)


@pytest.mark.parametrize("per_layer", [False, True])
def test_decode_step_cache_layouts_match_no_cache_forward(params, per_layer):
  """Prefill + two one-token steps through either cache layout equal `hidden_states` over the whole sequence."""
  tokens, valid = _batch()
  extra = jnp.array([[7, 8], [9, 10], [11, 12], [13, 14]], jnp.int32)
  seq, seq_valid = jnp.concatenate([tokens, extra], 1), jnp.concatenate([valid, jnp.ones_like(extra, bool)], 1)
  want = decoder.hidden_states(CONFIG, params, seq, seq_valid)[:, -3:]
  p = decoder.unstack_layers(params) if per_layer else params
  cache = decoder.init_cache(CONFIG, 4, 18, per_layer=per_layer)
  pos = decoder.default_positions(valid)
  h, cache = decoder.decode_step(CONFIG, p, tokens, pos, valid, cache, 0)
  got = [h[:, -1]]
  for t in range(2):
    h, cache = decoder.decode_step(CONFIG, p, extra[:, t:t + 1], pos[:, -1:] + 1 + t, jnp.ones((4, 1), bool), cache,
                                   16 + t)
    got.append(h[:, 0])
  chex.assert_trees_all_close(jnp.stack(got, 1), want, atol=1e-5)


def test_top_k_stays_on_the_topk_kernel():
  # XLA:CPU lowers lax.top_k to a full sort of the row when the values feed later math (17x slower sampling
  # at V = 32000); the sampler's top-k must compile to the TopK kernel, with no sort.
  import re
  s = SamplingConfig(max_new_tokens=8, top_k=50)
  z = jnp.zeros((4, 4096))
  hlo = jax.jit(lambda z: sampler.choose_tokens_with_stats(z, jax.random.key(0), s)).lower(z).compile().as_text()
  assert not re.findall(r"\bsort\(", hlo)
  if jax.default_backend() == "cpu":
    assert re.findall(r'custom_call_target="[^"]*[Tt]op[Kk]', hlo)


def test_bf16_head_is_the_rounded_head(params):
  """head_dtype="bfloat16": the sampler's log-probs are those of a fresh fp32 forward whose LM head (and final
  hidden state) are rounded to bf16, and they differ from the fp32 head's by about that rounding."""
  tokens, valid = _batch()
  sampling = dataclasses.replace(TEMPERED, head_dtype="bfloat16")
  out = sampler.sample(CONFIG, params, tokens, valid, jax.random.key(1), sampling)
  h = decoder.hidden_states(CONFIG, params, out.seq_tokens_BxS, out.seq_valid_BxS, out.seq_positions_BxS)
  round_ = lambda x: np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  logits = round_(h) @ round_(decoder.unembed_matrix(CONFIG, params))
  z = logits[:, -N - 1:-1] / TEMPERED.temperature
  logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
  want = np.take_along_axis(logp, np.asarray(out.tokens_BxN)[..., None], -1)[..., 0]
  mask = np.asarray(out.mask_BxN)
  np.testing.assert_allclose(np.asarray(out.logp_BxN)[mask], want[mask], atol=2e-4)
  fp32, _ = _fresh_logp(params, out, TEMPERED.temperature)
  gap = np.abs(fp32[mask] - want[mask]).max()
  assert 1e-3 < gap < 0.1, gap  # the rounding is visible (7e-3 here), and small


def test_num_samples_prefills_once_and_equals_repeated_prompts(params):
  """num_samples=G: each prompt prefilled once, its cache repeated; the same draws as the prompts repeated G times."""
  tokens, valid = _batch()
  G = 3
  got = sampler.sample(CONFIG, params, tokens, valid, jax.random.key(4), TEMPERED, num_samples=G)
  want = sampler.sample(CONFIG, params, jnp.repeat(tokens, G, 0), jnp.repeat(valid, G, 0), jax.random.key(4), TEMPERED)
  chex.assert_shape(got.tokens_BxN, (len(PROMPTS) * G, N))
  np.testing.assert_array_equal(got.tokens_BxN, want.tokens_BxN)
  for field in ("mask_BxN", "lengths_B", "seq_tokens_BxS", "seq_valid_BxS", "seq_positions_BxS"):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
  chex.assert_trees_all_close((got.logp_BxN, got.self_certainty_BxN, got.entropy_BxN),
                              (want.logp_BxN, want.self_certainty_BxN, want.entropy_BxN), atol=1e-5)
  assert len({tuple(r) for r in np.asarray(got.tokens_BxN)[:G]}) > 1  # a group's samples differ
  with pytest.raises(ValueError, match=r"num_samples=0; must be an int >= 1"):
    sampler.sample(CONFIG, params, tokens, valid, jax.random.key(4), TEMPERED, num_samples=0)


def test_layer_loop_auto_unrolls_small_models_and_scans_big_ones(params, monkeypatch):
  assert sampler.unrolls(SamplingConfig(), params)  # 2 small layers
  monkeypatch.setattr(sampler, "UNROLL_MAX_BYTES", 4 * sum(x.size for x in jax.tree.leaves(params["layers"])) - 1)
  assert not sampler.unrolls(SamplingConfig(), params)
  with pytest.raises(ValueError, match="layer_loop='fold'"):
    sampler.unrolls(SamplingConfig(layer_loop="fold"), params)
  # CONFIG's head is tied: the scanned path reads it untransposed, the unrolled one transposed; same samples.
  assert CONFIG.tie_word_embeddings
  tokens, valid = _batch()
  unrolled, scanned = (sampler.sample(CONFIG, params, tokens, valid, jax.random.key(3),
                                      dataclasses.replace(TEMPERED, layer_loop=loop)) for loop in ("unroll", "scan"))
  np.testing.assert_array_equal(unrolled.tokens_BxN, scanned.tokens_BxN)
  np.testing.assert_allclose(unrolled.logp_BxN, scanned.logp_BxN, atol=1e-5)
