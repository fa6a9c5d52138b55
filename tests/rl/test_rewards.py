"""Pure rewards: the format reward, and self-certainty against a numpy oracle."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exrl import tasks
from exrl.rl import rewards


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


def test_entropy_rewards_match_numpy():
  rng = np.random.default_rng(0)
  h = rng.random((3, 5)).astype(np.float32)
  mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
  want = [-(h[0, :2].mean()), -(h[1].mean()), 0.0]
  np.testing.assert_allclose(rewards.entropy_rewards(h, mask), want, rtol=1e-6)
  h[0, 3] = np.nan  # masked-out values are never read
  assert np.isfinite(rewards.entropy_rewards(h, mask)).all()


def test_majority_vote_rewards():
  answers = ["4", "4", "5", None,   None, None, None, None,   "1", "2", "2", "1"]
  # Group 0: "4" wins; group 1: nothing extractable; group 2: a 2-2 tie goes to "1", seen first.
  np.testing.assert_array_equal(rewards.majority_vote_rewards(answers, 4), [1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1])
  with pytest.raises(ValueError, match="group_size=4"):
    rewards.majority_vote_rewards(answers[:5], 4)


def test_controls_are_deterministic_and_keep_group_values():
  key = jax.random.key(3)
  a, b = rewards.noise_rewards(key, 4000), rewards.noise_rewards(key, 4000)
  np.testing.assert_array_equal(a, b)
  assert abs(a.mean()) < 0.1 and abs(a.std() - 1) < 0.1
  x = np.arange(12, dtype=np.float32)
  y = rewards.shuffle_within_groups(x, 4, key)
  for g in range(3):  # the same values in every group, in another order somewhere
    np.testing.assert_array_equal(np.sort(y[4 * g:4 * g + 4]), x[4 * g:4 * g + 4])
  assert not np.array_equal(y, x)
  np.testing.assert_array_equal(y, rewards.shuffle_within_groups(x, 4, key))
