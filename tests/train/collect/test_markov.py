"""Delethink RL: chunk rows carry their trace's advantage, the loss normalises by the trace's tokens over
all its chunks (numpy oracle), shapes are bucketed, and `train_rl` runs with the Markov collector."""
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from exrl.curriculum.source import TaskSource
from exrl.rl.losses import LossConfig, policy_loss
from exrl.rollout.markov import MarkovConfig
from exrl.rollout.sampler import SamplingConfig
from exrl.tasks import get_task
from exrl.train.collect.markov import MarkovCollector
from exrl.train.experience import pack_microbatches
from exrl.train.rl_loop import RLConfig, train_rl
from exrl.train.state import OptimConfig
from tests.train.mini_rl import TINY

MK = MarkovConfig(chunk_size=16, carryover=8, head=2, max_chunks=4)
TASK = get_task("running_sum", min_steps=2, max_steps=4)


def has_seven(response: str, problem) -> float:
  """A reward with variance under a random model: the response contains a 7."""
  del problem
  return float("7" in response)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tokenizer = common.build_tokenizer([TASK], tmp_path_factory.mktemp("tok"), vocab_size=40)
  config, params = common.init_model(TINY, tokenizer, seed=0)
  return tokenizer, config, params


def _cfg(tmp, **kw):
  return RLConfig(run_dir=str(tmp), steps=2, prompts_per_step=4, group_size=4, checkpoint_every=1,
                  loss=LossConfig(aggregation="seq_mean_token_mean"), **kw)


def test_rows_are_chunks_with_the_trace_advantage(setup, tmp_path):
  tokenizer, config, params = setup
  collector = MarkovCollector(_cfg(tmp_path), MK, config, tokenizer, verify=has_seven)
  try:
    exp = collector.collect(params, params, TASK.generate(4, seed=0), jax.random.key(0))
  finally:
    collector.close()
  rows, n_B = exp.rows, np.asarray(exp.traces["chunks"])
  B, R = 16, int(n_B.sum())
  assert rows["tokens"].shape[0] % B == 0 and rows["tokens"].shape[0] >= R  # bucketed row count
  assert rows["tokens"].shape[1] == 16 + MK.chunk_size  # query bucket + C
  np.testing.assert_array_equal(rows["trace_id"][:R], np.repeat(np.arange(B), n_B))
  np.testing.assert_array_equal(rows["group_id"][:R], np.repeat(np.arange(B) // 4, n_B))
  assert not rows["valid"][R:].any() and not rows["loss_mask"][R:].any()  # padding rows carry nothing
  # Every chunk of a trace has the trace's advantage; lengths add up over chunks.
  adv_B = np.array([rows["adv"][:R][rows["trace_id"][:R] == b][0] for b in range(B)])
  for b in range(B):
    np.testing.assert_array_equal(rows["adv"][:R][rows["trace_id"][:R] == b], adv_B[b])
    assert rows["loss_mask"][:R][rows["trace_id"][:R] == b].sum() == exp.traces["length"][b]
  reward = np.asarray(exp.traces["reward"]).reshape(4, 4)
  assert reward.std(1).max() > 0, "need reward variance to test advantages"
  expect = (reward - reward.mean(1, keepdims=True)) / (reward.std(1, ddof=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(adv_B, expect.reshape(-1), atol=1e-4)
  assert 1 <= exp.metrics["chunks_mean"] <= MK.max_chunks


def test_loss_normalises_by_trace_tokens_over_chunks(setup, tmp_path):
  tokenizer, config, params = setup
  collector = MarkovCollector(_cfg(tmp_path), MK, config, tokenizer, verify=has_seven)
  try:
    exp = collector.collect(params, params, TASK.generate(4, seed=1), jax.random.key(1))
  finally:
    collector.close()
  rows = exp.rows
  rng = np.random.default_rng(0)
  logp = (rows["old_logp"] + rng.normal(0, 0.3, rows["old_logp"].shape)).astype(np.float32)  # ratio != 1
  cfg = LossConfig(aggregation="seq_mean_token_mean", clip_eps_low=0.2, clip_eps_high=0.28)
  # Oracle: per trace, the sum over all its chunks' tokens of the clipped objective / its token count;
  # then the mean over traces with tokens (zero-variance groups are masked out).
  ratio = np.exp(logp - rows["old_logp"])
  adv = rows["adv"][:, None]
  tok_loss = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.28) * adv)
  per_trace = []
  for t in np.unique(rows["trace_id"]):
    sel = rows["trace_id"] == t
    mask = rows["loss_mask"][sel]
    if mask.sum() > 0:
      per_trace.append((tok_loss[sel] * mask).sum() / mask.sum())
  oracle = np.mean(per_trace)
  loss, _ = policy_loss(jnp.asarray(logp), jnp.asarray(rows["old_logp"]), jnp.asarray(rows["adv"]),
                        jnp.asarray(rows["loss_mask"]), cfg, trace_id_B=jnp.asarray(rows["trace_id"]))
  np.testing.assert_allclose(float(loss), oracle, rtol=1e-5)
  # Packed into two micro-batches (groups whole), the token-count weighting the step uses recombines them.
  packed = pack_microbatches(rows, 2)
  logp_packed = pack_microbatches({**rows, "old_logp": logp}, 2)["old_logp"]
  parts = []
  for m in range(2):
    l, _ = policy_loss(jnp.asarray(logp_packed[m]), jnp.asarray(packed["old_logp"][m]), jnp.asarray(packed["adv"][m]),
                       jnp.asarray(packed["loss_mask"][m]), cfg, trace_id_B=jnp.asarray(packed["trace_id"][m]))
    traces = len({t for t, c in zip(packed["trace_id"][m], packed["loss_mask"][m].sum(1)) if c > 0})
    parts.append((float(l), traces))
  np.testing.assert_allclose(sum(l * n for l, n in parts) / sum(n for _, n in parts), oracle, rtol=1e-5)


def test_train_rl_with_markov_collector(setup, tmp_path):
  tokenizer, config, params = setup
  cfg = _cfg(tmp_path / "run", optim=OptimConfig(lr=1e-3, warmup_frac=0.0, min_lr_ratio=1.0))
  collector = MarkovCollector(cfg, MK, config, tokenizer, verify=has_seven)
  try:
    state, _ = train_rl(cfg, config, params, tokenizer, TaskSource(TASK, seed=0), collector=collector,
                        verify=has_seven)
  finally:
    collector.close()
  lines = [json.loads(l) for l in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2]
  assert all(1 <= l["metrics"]["chunks_mean"] <= MK.max_chunks for l in lines)
  assert all(np.isfinite(l["metrics"]["loss"]) for l in lines)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, params))
  assert max(moved) > 0
