"""The RL loop end to end on tiny sizes: it learns a trivially learnable reward, and bad configs fail early."""
import chex
import numpy as np
import pytest

from exrl.models.config import ModelConfig
from exrl.infra.metrics import read_jsonl
from exrl.train.rl_loop import RLConfig
from exrl.train.trainer import check_vocab
from tests.train import mini_rl


def test_reward_goes_up_on_a_trivial_task(tmp_path):
  state, _ = mini_rl.run(str(tmp_path), steps=12, lr=1e-2, verify=mini_rl.starts_with_one)
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  reward = np.array([r["metrics"]["reward_mean"] for r in rows])
  for r in rows:
    chex.assert_tree_all_finite({k: v for k, v in r["metrics"].items()})
  assert reward[-3:].mean() > reward[:3].mean() + 0.3, reward
  chex.assert_tree_all_finite(state.params)


def test_bad_configs_fail_at_start():
  with pytest.raises(ValueError, match="group_size=1"):
    RLConfig(group_size=1)
  with pytest.raises(ValueError, match="num_microbatches=3"):
    RLConfig(prompts_per_step=4, group_size=4, num_microbatches=3)
  with pytest.raises(ValueError, match="reward='labels'"):
    RLConfig(reward="labels")
  # Checked when the config is built, before any model loads (each used to fail late or not at all).
  with pytest.raises(ValueError, match="checkpoint_every=0 must be >= 1"):
    RLConfig(checkpoint_every=0)
  with pytest.raises(ValueError, match="keep_checkpoints=0 must be >= 1"):
    RLConfig(keep_checkpoints=0)
  with pytest.raises(ValueError, match="verifier_timeout_s=0 must be > 0"):
    RLConfig(verifier_timeout_s=0)

  class Tok:
    vocab_size = 1000

  with pytest.raises(ValueError, match="tokenizer vocab_size=1000 exceeds the model's vocab_size=64"):
    check_vocab(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                            num_kv_heads=1, head_dim=16), Tok())


def test_group_correlation_matches_numpy():
  from exrl.train.collect.core import group_correlation
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal(12), (rng.random(12) > 0.5).astype(float)
  y[8:] = 1.0  # a constant group is skipped
  want = np.mean([np.corrcoef(x[i:i + 4], y[i:i + 4])[0, 1] for i in (0, 4)])
  np.testing.assert_allclose(group_correlation(x, y, 4), want, rtol=1e-10)


def test_nonfinite_updates_are_skipped_then_stop(tmp_path, monkeypatch):
  """From step 3 on the advantages are NaN: updates are skipped and counted, the run stops after 3 in a row
  with a message naming the last good checkpoint, and that checkpoint holds finite params."""
  from exrl.train.collect import core as collect
  from exrl.infra.checkpoint import Checkpointer

  calls = {"n": 0}
  real = collect.compute_advantages

  def poisoned(*a, **k):
    calls["n"] += 1
    adv, keep = real(*a, **k)
    return (adv * np.nan if calls["n"] >= 3 else adv), keep

  monkeypatch.setattr(collect, "compute_advantages", poisoned)
  with pytest.raises(FloatingPointError, match=r"step 5: 3 consecutive updates .* last good checkpoint \(step 4\)"):
    mini_rl.run(str(tmp_path), steps=8)
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["metrics"]["skipped"] for r in rows] == [0, 0, 1, 1]
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    state4, _ = ckpt.restore(4)
    state3, _ = ckpt.restore(3)  # step 3 was the first skipped update: params of step 2
  chex.assert_tree_all_finite(state4["params"])
  chex.assert_trees_all_equal(state4["params"], state3["params"])  # skipped updates left the params alone


def test_decode_completion_drops_padded_vocab_ids(tmp_path):
  """A model with a padded vocab may sample ids the tokenizer lacks; decoding must not crash."""
  from experiments import common
  from exrl.tasks import get_task
  from exrl.train.evaluate import decode_completion
  tok = common.build_tokenizer([get_task("arithmetic", digits=1)], tmp_path)
  ids = tok.encode("7+5=12")
  assert decode_completion(tok, ids + [tok.vocab_size, tok.vocab_size + 3]) == tok.decode(ids) == "7+5=12"
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode(ids + [tok.vocab_size])
