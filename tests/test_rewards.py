"""Rewards: time-bounded verifier pool, format reward, and self-certainty against a numpy oracle."""
import os
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exrl import tasks
from exrl.rl import rewards


# Verifiers used by the tests; module-level so worker processes can import them.
def sleep_forever(response, problem):
  while True:
    time.sleep(1)


def raise_error(response, problem):
  raise RuntimeError("parser exploded on " + response)


def die(response, problem):
  os._exit(3)


def by_response(response, problem):
  """Behaviour chosen by the response text, so one batch mixes good, hanging, raising and dying calls."""
  if response == "hang":
    return sleep_forever(response, problem)
  if response == "raise":
    return raise_error(response, problem)
  if response == "die":
    return die(response, problem)
  if response == "nan":
    return float("nan")
  if response == "big":
    return 7.0
  return float(response == problem.answer)


@pytest.fixture(scope="module")
def pool():
  with rewards.VerifierPool(num_workers=2, timeout_s=1.0) as p:
    p.map(by_response, [("1", tasks.Problem("", "1"))])  # Warm the workers up outside the timed checks.
    yield p


def test_hanging_raising_and_dying_verifiers_score_zero_and_are_counted(pool):
  p = tasks.Problem("x", "ok")
  resp = ["ok", "hang", "no", "raise", "ok", "hang", "die", "nan", "big", "ok"]
  t0 = time.perf_counter()
  r, info = pool.map(by_response, [(x, p) for x in resp])
  elapsed = time.perf_counter() - t0
  chex.assert_shape(r, (len(resp),))
  assert r.dtype == np.float32
  np.testing.assert_array_equal(r, [1, 0, 0, 0, 1, 0, 0, 0, 1, 1])  # "big" (7.0) is clipped to 1.
  assert info["verifier_timeouts"] == 2
  assert info["verifier_errors"] == 3  # raise, die, nan.
  assert any("parser exploded" in m for m in info["verifier_error_examples"])
  assert any("died (exit code 3)" in m for m in info["verifier_error_examples"])
  # Two 1 s timeouts on two workers run in parallel: well under the sum of a serial run.
  assert elapsed < 6.0, elapsed
  # The pool recovered: a clean batch afterwards is all correct with no counts.
  r2, info2 = pool.map(by_response, [("ok", p)] * 4)
  np.testing.assert_array_equal(r2, [1, 1, 1, 1])
  assert info2["verifier_timeouts"] == info2["verifier_errors"] == 0


def test_all_hanging_batch_returns_promptly():
  with rewards.VerifierPool(num_workers=2, timeout_s=0.5) as pool:
    t0 = time.perf_counter()
    r, info = pool.map(sleep_forever, [("a", None)] * 4)
    elapsed = time.perf_counter() - t0
  np.testing.assert_array_equal(r, np.zeros(4, np.float32))
  assert info["verifier_timeouts"] == 4 and info["verifier_errors"] == 0
  assert elapsed < 8.0, elapsed  # 2 rounds of 0.5 s plus worker restarts.


def test_raising_verifier_counted():
  with rewards.VerifierPool(num_workers=1, timeout_s=2.0) as pool:
    r, info = pool.map(raise_error, [("a", None), ("b", None)])
  np.testing.assert_array_equal(r, [0, 0])
  assert info["verifier_errors"] == 2 and info["verifier_timeouts"] == 0


def test_verifier_rewards_builtin_and_math_dispatch(pool):
  ar, ch = tasks.ArithmeticTask(), tasks.ChainSumTask()
  a = ar.generate(3, seed=0)
  c = ch.generate(2, seed=0)
  math_p = tasks.Problem("Half of one?", "\\frac{1}{2}", "math")
  problems = a + c + [math_p, math_p]
  resp = [a[0].answer, "999999", a[2].answer + " ", ch.sft_target(c[0]), "answer: 1000",
          "so it is $0.5$", "\\boxed{2}"]
  r, info = rewards.verifier_rewards(resp, problems, pool=pool)
  np.testing.assert_array_equal(r, [1, 0, 1, 1, 0, 1, 0])
  assert info["verifier_timeouts"] == info["verifier_errors"] == 0
  # An explicit verifier (a task's bound method) is used for every pair.
  r, _ = rewards.verifier_rewards([ar.sft_target(x) for x in a], a, ar.verify, pool=pool)
  np.testing.assert_array_equal(r, [1, 1, 1])
  with pytest.raises(ValueError, match="2 responses but 1 problems"):
    rewards.verifier_rewards(["a", "b"], a[:1], pool=pool)


def test_format_rewards():
  resp = ["7+5=12,12+9=21. answer: 21", "answer: 21", "7+5=12. answer: 2. answer: 3", "7+5=12", "answer: x",
          " 7+5=12. answer: 12\n"]
  np.testing.assert_array_equal(rewards.format_rewards(resp, tasks.ChainSumTask.format_regex), [1, 0, 0, 0, 0, 1])
  np.testing.assert_array_equal(rewards.format_rewards(resp), [1, 1, 0, 0, 0, 1])
  np.testing.assert_array_equal(rewards.format_rewards(["81", "8 1", "-3", ""], tasks.ArithmeticTask.format_regex),
                                [1, 0, 1, 0])


def _np_self_certainty(z_BxTxV):
  z = z_BxTxV.astype(np.float64)
  zmax = z.max(-1, keepdims=True)
  lse = (zmax + np.log(np.exp(z - zmax).sum(-1, keepdims=True)))[..., 0]
  return lse - z.mean(-1) - np.log(z.shape[-1])


def test_self_certainty_reward_matches_numpy():
  rng = np.random.default_rng(0)
  B, T, V = 4, 7, 37
  z = rng.normal(size=(B, T, V)).astype(np.float32) * 3
  mask = np.zeros((B, T), np.int32)
  mask[0, 2:] = 1          # Response after a prompt.
  mask[1, 3:5] = 1         # Response with right padding.
  mask[2, :] = 1
  # Row 3: empty response -> reward 0.
  sc_tok = _np_self_certainty(z)
  # Per-token values from jax (what kernels.token_stats computes), then the reward.
  zj = jnp.asarray(z)
  sc_jax = jax.nn.logsumexp(zj, -1) - zj.mean(-1) - jnp.log(V)
  # Garbage outside the mask must not leak in.
  sc_jax = jnp.where(jnp.asarray(mask) > 0, sc_jax, jnp.nan)
  r = rewards.self_certainty_reward(sc_jax, jnp.asarray(mask))
  expected = np.array([sc_tok[b][mask[b] > 0].mean() if mask[b].any() else 0.0 for b in range(B)])
  chex.assert_shape(r, (B,))
  assert r.dtype == jnp.float32
  chex.assert_tree_all_finite(r)
  chex.assert_trees_all_close(r, expected.astype(np.float32), rtol=1e-5, atol=1e-6)
  assert (expected[:3] > 0).all() and r[3] == 0.0
  # Bool masks work the same; the reward is detached.
  chex.assert_trees_all_close(rewards.self_certainty_reward(sc_jax, jnp.asarray(mask) > 0), r)
  g = jax.grad(lambda s: rewards.self_certainty_reward(s, jnp.asarray(mask)).sum())(jnp.asarray(sc_tok, jnp.float32))
  np.testing.assert_array_equal(np.asarray(g), 0.0)
