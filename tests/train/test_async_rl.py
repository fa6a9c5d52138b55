"""The bounded-staleness scheduler (exrl.train.async_rl) with stand-in generation and training, and the versioned
generator's tags across a hand-built in-flight weight switch (exrl.rollout.versioned), alone and inside the real
rollout worker (exrl.train.async_loop)."""
import random
import threading
import time

import jax
import numpy as np
import pytest

from experiments import common
from exrl.curriculum.source import TaskSource
from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.rl.losses import LossConfig
from exrl.rollout import continuous, versioned
from exrl.rollout.sampler import SamplingConfig
from exrl.tasks import get_task, pool as pool_lib
from exrl.train import async_loop, async_rl, experience
from exrl.train.async_loop import handle_stale
from exrl.train.collect.groups import GroupCollector
from exrl.train.rl_loop import RLConfig
from tests.train import mini_rl

GROUPS = 4


def _run(max_lag, steps, schedule, start=0, seed=0, switch=True):
  """A stand-in run: generation polls for newer params between fake decode steps (in-flight switches) and tags each
  group with its oldest token's version; the trainer checks the lag of every batch it takes."""
  rng = random.Random(seed)
  gen_sleeps = [rng.uniform(0, 2e-3) for _ in range(steps * 4)]
  train_sleeps = [rng.uniform(0, 4e-3) for _ in range(steps)]
  used = {}

  def generate(step, version, params, box):
    assert params == {"v": version}
    token_versions = []
    for d in range(4):  # four decode steps; free mode takes a newer version between them
      time.sleep(gen_sleeps[(step * 4 + d) % len(gen_sleeps)])
      if switch and schedule == "free":
        version, params = box.latest()
      token_versions.append(version)
    used[step] = token_versions
    return step, np.full((GROUPS,), min(token_versions))

  sched = async_rl.Scheduler(generate, max_lag=max_lag, start=start, steps=steps, params={"v": start},
                             schedule=schedule)
  lags = []
  try:
    for step in range(start, steps):
      rollout, _ = sched.next(step)
      assert rollout.payload == step
      stale_G, m = async_rl.lag_metrics(step, rollout.min_version_G, max_lag)
      assert not stale_G.any()
      lags.append(m["lag/max"])
      time.sleep(train_sleeps[step])
      sched.publish(step + 1, {"v": step + 1})
  finally:
    sched.close()
  return lags, used


@pytest.mark.parametrize("max_lag", [1, 3])
def test_lag_never_exceeds_k_with_random_timings(max_lag):
  lags, used = _run(max_lag, 200, "free")
  assert max(lags) <= max_lag and len(lags) == 200
  assert max(lags) > 0  # the worker really ran ahead
  assert any(len(set(v)) > 1 for v in used.values())  # and switched versions in flight
  for step, versions in used.items():
    assert versions == sorted(versions) and min(versions) >= step - max_lag


def test_deterministic_schedule_fixes_versions_whatever_the_timings():
  for seed in (0, 1):
    lags, used = _run(2, 30, "deterministic", start=5, seed=seed)
    assert {s: v[0] for s, v in used.items()} == {s: max(5, s - 2) for s in range(5, 30)}
    assert lags == [min(s - 5, 2) for s in range(5, 30)]


def test_k0_is_lockstep():
  lags, used = _run(0, 20, "free")
  assert lags == [0] * 20 and all(set(v) == {s} for s, v in used.items())


def test_worker_error_reaches_the_trainer_as_one_line():
  def generate(step, version, params, box):
    if step == 3:
      raise ValueError("bad prompt\nsecond line of detail")
    return step, np.zeros(1)

  sched = async_rl.Scheduler(generate, max_lag=2, start=0, steps=10, params={}, schedule="free")
  t0 = time.time()
  with pytest.raises(async_rl.WorkerError) as e:
    for step in range(10):
      sched.next(step)
      sched.publish(step + 1, {})
  sched.close(timeout_s=5)
  assert str(e.value) == "rollout worker failed at step 3: ValueError: bad prompt"
  assert not any(t.name == "exrl-rollout-worker" for t in threading.enumerate())
  assert time.time() - t0 < 5


def test_trainer_failure_does_not_hang_a_waiting_worker():
  sched = async_rl.Scheduler(lambda s, v, p, b: (s, np.zeros(1)), max_lag=1, start=0, steps=50, params={})
  sched.next(0)  # the worker now waits for version 1 to start step 2; the trainer never publishes it
  t0 = time.time()
  sched.close(timeout_s=5)
  assert time.time() - t0 < 1


def test_stale_groups_are_flagged():
  stale, m = async_rl.lag_metrics(10, np.array([10, 9, 7, 5]), max_lag=2)
  assert stale.tolist() == [False, False, True, True]
  assert (m["lag/hist_0"], m["lag/hist_1"], m["lag/hist_2"], m["lag/over_frac"], m["lag/max"]) == (
      0.25, 0.25, 0.0, 0.5, 5.0)
  with pytest.raises(ValueError, match="from the future"):
    async_rl.lag_metrics(3, np.array([4]), max_lag=2)


CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                  head_dim=16, max_position_embeddings=32)
PROMPTS, P, G, SWITCH = [[1, 2, 3], [4, 5, 6, 7, 8]], 8, 2, 3


def test_version_tags_across_an_in_flight_switch():
  p0 = decoder.init_params(CFG, jax.random.key(0))
  p1 = decoder.init_params(CFG, jax.random.key(1))  # a very different policy
  p0_copy = jax.tree.map(lambda x: x + 0, p0)  # the same values, published as a new version
  s = SamplingConfig(max_new_tokens=8, temperature=1.0)
  key = jax.random.key(7)
  gen = lambda new: versioned.generate(CFG, lambda d: (0, p0) if d < SWITCH else (1, new), PROMPTS, s,
                                       num_samples=G, prompt_len=P, key=key)
  same, switched = gen(p0_copy), gen(p1)
  ref, _ = continuous.run(CFG, p0, [continuous.Request(p, G) for p in PROMPTS], s, slots=len(PROMPTS) * G,
                          prompt_len=P, key=key)
  ref_tokens = np.stack([r.tokens for rows in ref for r in rows])
  np.testing.assert_array_equal(same["tokens"], ref_tokens)  # a switch to equal values changes nothing
  n = same["mask"].sum(1)
  want = np.where(np.arange(8)[None] < n[:, None], np.where(np.arange(8)[None] < SWITCH, 0, 1), -1)
  np.testing.assert_array_equal(same["version"], want)
  # With a different policy, tokens before the switch are p0's and some after it change; tags follow the switch.
  np.testing.assert_array_equal(switched["tokens"][:, :SWITCH], ref_tokens[:, :SWITCH])
  assert (switched["tokens"][:, SWITCH:] != ref_tokens[:, SWITCH:]).any()
  live = switched["version"] >= 0
  np.testing.assert_array_equal(switched["version"][live], np.where(np.nonzero(live)[1] < SWITCH, 0, 1))
  assert (switched["min_version"] == 0).all()


def test_weight_checks_every_k_steps():
  """every=4: params_fn is asked at decode steps 0, 4, ...; a version published at step 3 takes effect at step 4,
  and the tokens drawn in between stay tagged with (and drawn by) the older version."""
  p0, p1 = decoder.init_params(CFG, jax.random.key(0)), decoder.init_params(CFG, jax.random.key(1))
  s = SamplingConfig(max_new_tokens=8, temperature=1.0)
  key, asked = jax.random.key(7), []

  def params_fn(d):
    asked.append(d)
    return (0, p0) if d < SWITCH else (1, p1)

  got = versioned.generate(CFG, params_fn, PROMPTS, s, num_samples=G, prompt_len=P, key=key, every=4)
  assert asked == [0, 4]
  at4 = versioned.generate(CFG, lambda d: (0, p0) if d < 4 else (1, p1), PROMPTS, s, num_samples=G, prompt_len=P,
                           key=key)  # every=1, switching at step 4: the same tokens and tags
  for name in ("tokens", "logp", "version", "min_version"):
    np.testing.assert_array_equal(got[name], at4[name])
  live = got["version"] >= 0
  np.testing.assert_array_equal(got["version"][live], np.where(np.nonzero(live)[1] < 4, 0, 1))
  with pytest.raises(ValueError, match="every=0"):
    versioned.generate(CFG, params_fn, PROMPTS, s, num_samples=G, prompt_len=P, key=key, every=0)


def test_stale_groups_are_dropped_or_rescored():
  rows = {"group_id": np.array([0, 0, 1, 1]), "loss_mask": np.ones((4, 3), np.float32),
          "old_logp": np.full((4, 3), -1.0, np.float32)}
  stale_G = np.array([False, True])
  dropped = handle_stale(rows, stale_G, "drop", None)
  np.testing.assert_array_equal(dropped["loss_mask"].sum(1), [3, 3, 0, 0])
  rescored = handle_stale(rows, stale_G, "rescore", lambda r: np.full((4, 3), -2.0, np.float32))
  np.testing.assert_array_equal(rescored["old_logp"][:, 0], [-1, -1, -2, -2])
  np.testing.assert_array_equal(rescored["loss_mask"], rows["loss_mask"])
  assert handle_stale(rows, np.array([False, False]), "rescore", None) is rows


@pytest.mark.slow
def test_inflight_switch_inside_the_worker(tmp_path, monkeypatch):
  """The real worker (make_generate + GroupCollector + Scheduler): version 1 is published from inside the
  generation, at decode step SWITCH. Tokens drawn before it carry version 0 and p0's log-probs (an independent
  full forward: experience.score); the rest carry version 1; each group's lag is its oldest token's."""
  task = get_task("arithmetic", digits=1, ops="+")
  tokenizer = common.build_tokenizer([task], tmp_path, seed=0)
  config, p0 = common.init_model(mini_rl.TINY, tokenizer, 0)
  _, p1 = common.init_model(mini_rl.TINY, tokenizer, 1)
  cfg = RLConfig(prompts_per_step=2, group_size=2, max_lag=2, inflight_every=1, kl_monitor=False,
                 loss=LossConfig(kl_beta=0.0),
                 sampling=SamplingConfig(max_new_tokens=8, stop_token_ids=(config.vocab_size + 1,)))
  collector = GroupCollector(cfg, config, tokenizer, verify=task.verify, pool=pool_lib.default_pool())
  sched = None
  real_call = versioned.Feed.__call__

  def switching(feed, decode_step):
    if decode_step == SWITCH:
      sched.publish(1, p1)  # as the trainer would after an update, mid-generation
    return real_call(feed, decode_step)

  monkeypatch.setattr(versioned.Feed, "__call__", switching)
  source = TaskSource(task, seed=0)
  generate = async_loop.make_generate(cfg, collector, source, 2, None, jax.random.key_data(jax.random.key(0)),
                                      (threading.Lock(), threading.Lock()))
  sched = async_rl.Scheduler(generate, max_lag=2, start=0, steps=1, params=p0, schedule="free")
  try:
    rollout, _ = sched.next(0)
  finally:
    sched.close()
  _, exp = rollout.payload
  tags, rows = exp.traces["version"], exp.rows
  n = tags.shape[1]
  gen = tags >= 0
  assert gen.sum(1).min() > SWITCH  # every row was still generating at the switch (no stop token exists)
  np.testing.assert_array_equal(tags[gen], np.where(np.nonzero(gen)[1] < SWITCH, 0, 1))
  np.testing.assert_array_equal(rollout.min_version_G, [0, 0])
  want = experience.score(config, p0, None, rows["tokens"], rows["valid"], rows["positions"], rows["loss_mask"],
                          with_ref=False)["logp"]
  resp = slice(rows["tokens"].shape[1] - n, None)
  np.testing.assert_allclose(rows["old_logp"][:, resp][:, :SWITCH], np.asarray(want)[:, resp][:, :SWITCH], atol=2e-4)
  assert np.abs(rows["old_logp"][:, resp][:, SWITCH:] - np.asarray(want)[:, resp][:, SWITCH:]).max() > 1e-2
