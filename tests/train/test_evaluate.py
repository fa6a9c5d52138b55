"""The answer probe: diversity counts against hand-built answers, and per-sample self-certainty against a
numpy formula over the decoder's own logits for the same sampled tokens."""
import dataclasses

import jax
import numpy as np

from experiments import common
from exrl.models import decoder
from exrl.rollout import sampler
from exrl.tasks import extract_marked_int, get_task
from exrl.train.evaluate import answer_probe, answer_stats


def test_answer_stats_hand_built():
  answers = ["3", "3", None, "5",   "3", "7", "7", "7",   "9", None, None, "3"]  # 3 problems x 4 samples
  s = answer_stats(answers, 4)
  assert s["distinct_per_problem"] == (2 + 2 + 2) / 3
  assert s["distinct_overall"] == 4  # 3, 5, 7, 9
  assert s["top3"] == ["3", "7", "5"]  # counts 4, 3, then 5 and 9 tie at 1 (first seen wins)
  assert s["top3_share"] == (4 + 3 + 1) / 12
  assert s["no_answer"] == 3 / 12


def test_probe_self_certainty_matches_logits_formula(tmp_path):
  task = get_task("chain_sum", num_terms=2)
  tokenizer = common.build_tokenizer([task], tmp_path, vocab_size=32)
  config, params = common.init_model(common.TinyModel(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                                      head_dim=16, intermediate_size=64), tokenizer, 0)
  params = jax.tree.map(lambda x: 8 * x, params)  # sharper than init, so tokens differ in confidence
  problems = task.generate(3, seed=0, split="eval")
  samp = sampler.SamplingConfig(max_new_tokens=12, temperature=0.7)
  probe = answer_probe(config, params, tokenizer, problems, lambda t: str(extract_marked_int(t)), samp, samples=2,
                       seed=5)
  # The oracle: the same draw (same batch, key and stop ids), then SC = logsumexp(z) - mean(z) - log V of
  # softmax(logits / T) at every generated token, from a fresh full forward, averaged per sample.
  prompts = [p.prompt for p in problems for _ in range(2)]
  prompts += [prompts[-1]] * (8 - len(prompts))
  tokens, valid = sampler.pad_prompts([tokenizer.encode(p, add_bos=True) for p in prompts], tokenizer.pad_id)
  s = dataclasses.replace(samp, stop_token_ids=tuple(tokenizer.stop_ids), pad_id=tokenizer.pad_id)
  out = sampler.sample(config, params, tokens, valid, jax.random.fold_in(jax.random.key(5), 0), s)
  z = np.asarray(decoder.logits(config, params, out.seq_tokens_BxS, out.seq_valid_BxS, out.seq_positions_BxS),
                 np.float64) / 0.7
  P = tokens.shape[1]
  z_BxNxV = z[:, P - 1:-1]  # the logits that predicted each completion token
  lse = np.log(np.exp(z_BxNxV - z_BxNxV.max(-1, keepdims=True)).sum(-1)) + z_BxNxV.max(-1)
  sc_BxN = lse - z_BxNxV.mean(-1) - np.log(z.shape[-1])
  mask = np.asarray(out.mask_BxN)
  want = ((sc_BxN * mask).sum(1) / np.maximum(mask.sum(1), 1))[:6].mean()
  np.testing.assert_allclose(probe["self_certainty"], want, rtol=1e-4)
  assert probe["problems"] == 3 and probe["samples"] == 2 and 1 <= probe["distinct_per_problem"] <= 2
