"""The collector family: shared metrics over the same tokens (numpy oracle), unsupported fields, the reward registry.

Every collector runs on one hand-built batch: the sampler, the reference scoring and the verifier are replaced by
stand-ins that return known tokens, log-probs and entropies, so the oracle is plain numpy over the response tokens.
"""
import dataclasses
import types

import jax
import numpy as np
import pytest

from exrl.rl import rewards as rewards_lib
from exrl.rl.advantages import AdvantageConfig
from exrl.rollout.markov import MarkovConfig, MarkovOutput
from exrl.rollout.multiturn import MultiTurnConfig, Trajectory
from exrl.rollout.sampler import SampleOutput, SamplingConfig
from exrl.tasks.base import Problem
from exrl.train.collect import groups, markov, multiturn
from exrl.train.collect.multiturn import EnvProblem
from exrl.train.rl_loop import RLConfig

G = 2
# Per trace: (response token ids, their log-probs, their entropies). Traces 0-1 are group 0, 2-3 group 1.
TRACES = [([5, 6, 7], [-0.2, -1.1, -0.7], [0.9, 1.3, 0.4]),
          ([8, 3], [-2.0, -0.3], [1.7, 0.2]),
          ([4, 9, 6, 5, 3], [-0.5, -0.9, -0.1, -1.4, -0.6], [0.3, 0.8, 1.1, 0.6, 1.0]),
          ([7], [-0.8], [0.5])]
OUTCOME = np.array([1.0, 0.0, 1.0, 1.0], np.float32)  # group 1 is constant: filtered, its loss mask zeroed


def ref_logp(tok):
  """The stand-in reference's log-prob of a token: a fixed function of its id."""
  return -0.5 - 0.1 * (np.asarray(tok) % 5)


def oracle():
  toks = np.concatenate([t for t, _, _ in TRACES])
  logp = np.concatenate([lp for _, lp, _ in TRACES]).astype(np.float64)
  ent = np.concatenate([e for _, _, e in TRACES]).astype(np.float64)
  d = ref_logp(toks) - logp
  return {"kl": float(np.mean(np.exp(d) - d - 1)), "sample_entropy": float(ent.mean()),
          "response_len": float(np.mean([len(t) for t, _, _ in TRACES])), "reward_mean": float(OUTCOME.mean()),
          "accuracy": float(OUTCOME.mean())}


class Tok:
  pad_id, eos_id, stop_ids, vocab_size = 0, 1, (1,), 16

  def encode(self, s, add_bos=False):
    return [2, 2]

  def decode(self, ids):
    return " ".join(map(str, ids))


def fake_score(config, params, ref_params, tokens, valid, positions, response, *, with_ref, with_policy, **kw):
  assert with_ref and not with_policy
  resp = np.asarray(response) > 0
  return {"ref_logp": np.where(resp, ref_logp(np.asarray(tokens)), 0.0).astype(np.float32),
          "ref_sc_B": np.zeros(len(resp), np.float32)}


def fake_verifier(texts, problems, verify, pool):
  return OUTCOME.copy(), {"verifier_timeouts": 0, "verifier_errors": 0}


def fake_sample(config, params, tokens_UxP, valid_UxP, key, sampling, num_samples):
  B, P, N = len(TRACES), tokens_UxP.shape[1], 16
  o = {k: np.zeros((B, N), np.float32) for k in ("logp_BxN", "self_certainty_BxN", "entropy_BxN")}
  tokens, mask = np.zeros((B, N), np.int32), np.zeros((B, N), bool)
  for b, (t, lp, e) in enumerate(TRACES):
    n = len(t)
    tokens[b, :n], mask[b, :n], o["logp_BxN"][b, :n], o["entropy_BxN"][b, :n] = t, True, lp, e
  prompt = np.repeat(np.asarray(tokens_UxP), num_samples, 0)
  pvalid = np.repeat(np.asarray(valid_UxP), num_samples, 0)
  return SampleOutput(tokens_BxN=tokens, mask_BxN=mask, lengths_B=mask.sum(1).astype(np.int32),
                      seq_tokens_BxS=np.concatenate([prompt, tokens], 1),
                      seq_valid_BxS=np.concatenate([pvalid, mask], 1),
                      seq_positions_BxS=np.cumsum(np.concatenate([pvalid, mask], 1), 1) - 1, **o)


def fake_markov(config, params, tokens, valid, key, sampling, mk):
  """Each trace's response split over chunks of at most 2 tokens; each chunk row holds 2 prompt tokens first."""
  B, I, S = len(TRACES), 3, 4
  f = {k: np.zeros((B, I, S), np.float32) for k in ("logp", "self_certainty", "entropy")}
  tok, val, resp = np.zeros((B, I, S), np.int32), np.zeros((B, I, S), bool), np.zeros((B, I, S), bool)
  chunks = np.zeros(B, np.int32)
  for b, (t, lp, e) in enumerate(TRACES):
    for i, a in enumerate(range(0, len(t), 2)):
      n = min(2, len(t) - a)
      tok[b, i, :2], val[b, i, :2 + n] = 2, True
      tok[b, i, 2:2 + n], resp[b, i, 2:2 + n] = t[a:a + n], True
      f["logp"][b, i, 2:2 + n], f["entropy"][b, i, 2:2 + n] = lp[a:a + n], e[a:a + n]
      chunks[b] = i + 1
  return MarkovOutput(tokens_BxIxS=tok, valid_BxIxS=val, positions_BxIxS=np.cumsum(val, -1) - 1, response_BxIxS=resp,
                      logp_BxIxS=f["logp"], self_certainty_BxIxS=f["self_certainty"], entropy_BxIxS=f["entropy"],
                      num_chunks_B=chunks, lengths_B=resp.sum((1, 2)), stopped_B=np.ones(B, bool))


def fake_rollout(config, params, tokenizer, envs, idxs, key, cfg):
  """Agent turns of 2 tokens split by 1-token observations, after a 2-token instruction."""
  out = []
  for b, (t, lp, _) in enumerate(TRACES):
    toks, mask, logp = [2, 2], [0, 0], [0.0, 0.0]
    for a in range(0, len(t), 2):
      toks += list(t[a:a + 2]) + [3]
      mask += [1] * len(t[a:a + 2]) + [0]
      logp += list(lp[a:a + 2]) + [0.0]
    out.append(Trajectory("e", idxs[b], toks, mask, logp, [("", "", "")], float(OUTCOME[b]), True))
  return out


def _cfg(**kw):
  return RLConfig(group_size=G, prompts_per_step=2, advantage=AdvantageConfig(filter_zero_variance=True), **kw)


def _collectors(cfg):
  yield groups, groups.GroupCollector(cfg, None, Tok(), pool=object()), [Problem("q", "1")] * 2
  yield markov, markov.MarkovCollector(cfg, MarkovConfig(), None, Tok(), pool=object()), [Problem("q", "1")] * 2
  yield multiturn, multiturn.MultiTurnCollector(cfg, None, Tok(), lambda n: object(), MultiTurnConfig()), \
      [EnvProblem("e", 0), EnvProblem("e", 1)]


def test_every_collector_averages_shared_metrics_over_the_response_tokens(monkeypatch):
  monkeypatch.setattr(groups, "generate", fake_sample)
  monkeypatch.setattr(markov, "markov_sample", fake_markov)
  monkeypatch.setattr(multiturn, "rollout", fake_rollout)
  monkeypatch.setattr("exrl.tasks.pool.verifier_rewards", fake_verifier)
  want = oracle()
  seen = set()
  for module, collector, problems in _collectors(_cfg()):
    monkeypatch.setattr(module, "score", fake_score)
    exp = collector.collect(None, None, problems, jax.random.key(0))
    name = type(collector).__name__
    for k, v in want.items():
      if k == "sample_entropy" and module is multiturn:
        continue  # agent turns carry no entropy
      np.testing.assert_allclose(exp.metrics[k], v, rtol=1e-5, err_msg=f"{name} {k}")
    np.testing.assert_allclose(np.asarray(exp.traces["reward"]), OUTCOME, err_msg=name)
    np.testing.assert_array_equal(np.asarray(exp.traces["length"]), [len(t) for t, _, _ in TRACES], err_msg=name)
    adv = 0.5 / (np.std([1.0, 0.0], ddof=1) + 1e-6)  # GRPO on group 0; group 1 is constant: 0
    trace_adv = np.bincount(exp.rows["trace_id"], exp.rows["adv"], minlength=8)[:4] / np.maximum(
        np.bincount(exp.rows["trace_id"], minlength=8)[:4], 1)
    np.testing.assert_allclose(trace_adv, [adv, -adv, 0, 0], rtol=1e-5, err_msg=name)
    # The filtered group carries no loss, and only response tokens ever do.
    loss_traces = np.unique(exp.rows["trace_id"][exp.rows["loss_mask"].sum(1) > 0])
    np.testing.assert_array_equal(loss_traces, [0, 1], err_msg=name)
    assert exp.rows["loss_mask"].sum() == len(TRACES[0][0]) + len(TRACES[1][0]), name
    seen.add(name)
  assert seen == {"GroupCollector", "MarkovCollector", "MultiTurnCollector"}


def _away_from_default(cfg, dotted):
  """cfg with the dotted field set to a value other than its default."""
  head, _, rest = dotted.partition(".")
  value = getattr(cfg, head)
  if rest:
    return dataclasses.replace(cfg, **{head: _away_from_default(value, rest)})
  other = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v / 2, tuple: lambda v: v + (7,),
           str: lambda v: {"online": "offline", "static": "continuous"}.get(v, v + "x")}
  new = "bfloat16" if value is None else other[type(value)](value)
  if head == "think_budget":  # an interruption must fit the completion budget
    return dataclasses.replace(cfg, think_budget=4, answer_budget=4)
  return dataclasses.replace(cfg, **{head: new})


@pytest.mark.parametrize("field", sorted(multiturn.MultiTurnCollector.unsupported))
def test_multiturn_refuses_each_unsupported_field(field):
  cfg = _away_from_default(RLConfig(reward="self_certainty"), field)
  with pytest.raises(ValueError, match=rf"MultiTurnCollector does not support RLConfig\.{field}="):
    multiturn.MultiTurnCollector(cfg, None, Tok(), lambda n: object(), MultiTurnConfig())


@pytest.mark.parametrize("reward", [r for r, v in rewards_lib.REWARDS.items() if set(v.needs) - {"outcome"}])
def test_multiturn_refuses_rewards_it_cannot_compute(reward):
  with pytest.raises(ValueError, match=rf"cannot compute RLConfig.reward='{reward}'.*valid here: \('verifier', "
                                       rf"'noise'\)"):
    multiturn.MultiTurnCollector(RLConfig(reward=reward), None, Tok(), lambda n: object(), MultiTurnConfig())


@pytest.mark.parametrize("field", sorted(markov.MarkovCollector.unsupported))
def test_markov_refuses_each_unsupported_field(field):
  cfg = _away_from_default(RLConfig(), field)
  with pytest.raises(ValueError, match=rf"MarkovCollector does not support RLConfig\.{field}="):
    markov.MarkovCollector(cfg, MarkovConfig(), None, Tok(), pool=object())


def test_markov_refuses_a_budget_other_than_the_chunkings():
  mk = MarkovConfig()
  for n in (RLConfig().sampling.max_new_tokens, mk.budget):  # the default, or the chunking's own budget: accepted
    markov.MarkovCollector(RLConfig(sampling=SamplingConfig(max_new_tokens=n)), mk, None, Tok(), pool=object())
  with pytest.raises(ValueError, match=r"MarkovCollector does not support RLConfig\.sampling\.max_new_tokens=7"):
    markov.MarkovCollector(RLConfig(sampling=SamplingConfig(max_new_tokens=7)), mk, None, Tok(), pool=object())


@pytest.mark.parametrize("reward", list(rewards_lib.REWARDS))
def test_group_and_markov_collectors_take_every_registered_reward(reward):
  assert groups.GroupCollector.unsupported == {}
  cfg = RLConfig(reward=reward)
  groups.GroupCollector(cfg, None, Tok(), pool=object())
  markov.MarkovCollector(cfg, MarkovConfig(), None, Tok(), pool=object())


def test_settings_a_reward_ignores_are_refused():
  with pytest.raises(ValueError, match="sc_annotator='offline' has no effect with reward='verifier'"):
    RLConfig(sc_annotator="offline")
  with pytest.raises(ValueError, match=r"mix_weights=\(2.0, 1.0\) has no effect with reward='verifier'"):
    RLConfig(mix_weights=(2.0, 1.0))


def test_registry_columns_against_numpy():
  key = jax.random.key(3)
  sc = np.array([0.1, 0.4, 0.3, 0.2], np.float32)
  ent, mask = np.array([[1.0, 3.0], [2.0, 0.0], [0.5, 0.5], [4.0, 9.0]]), np.array([[1, 1], [1, 0], [1, 1], [1, 0]])
  x = rewards_lib.RewardInputs(group_size=2, key=key, outcome_B=OUTCOME, self_certainty_B=sc, entropy_BxN=ent,
                               mask_BxN=mask, answers=["3", "4", None, "5"])
  want = {"verifier": [OUTCOME], "self_certainty": [sc], "mix": [OUTCOME, sc],
          "entropy": [[-2.0, -2.0, -0.5, -4.0]], "majority": [[1, 0, 0, 1]]}
  for name, cols in want.items():
    np.testing.assert_allclose(rewards_lib.reward_columns(name, x), np.stack(cols, 1), err_msg=name)
  noise = rewards_lib.reward_columns("noise", x)[:, 0]
  np.testing.assert_array_equal(noise, np.asarray(jax.random.normal(jax.random.fold_in(key, 0x5EED), (4,))))
  shuffled = rewards_lib.reward_columns("shuffled", x)[:, 0]
  assert sorted(shuffled[:2]) == sorted(sc[:2]) and sorted(shuffled[2:]) == sorted(sc[2:])
  with pytest.raises(ValueError, match=r"reward='entropy' needs \['token_entropy'\]"):
    rewards_lib.reward_columns("entropy", rewards_lib.RewardInputs(group_size=2, outcome_B=OUTCOME))


def test_help_lists_the_registry():
  import typing
  from exrl.train.rl_loop import RewardName
  assert typing.get_args(RewardName) == tuple(rewards_lib.REWARDS)
