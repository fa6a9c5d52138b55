"""exrl.rl.advantages against a plain-numpy oracle that loops over groups."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exrl.rl.advantages import AdvantageConfig, compute_advantages

# Jitted once per (config, group_size, shape): faster than eager op-by-op dispatch on CPU.
jit_advantages = jax.jit(compute_advantages, static_argnums=(1, 2))


def np_advantages(rewards, mode, group_size, eps=1e-6, filt=False, ddof=1, weights=None):
  """Independent oracle: explicit loops over groups and reward signals, float64."""
  r = np.asarray(rewards, np.float64)
  if r.ndim == 1:
    r = r[:, None]
  b, nr = r.shape
  w = np.ones(nr) if weights is None else np.asarray(weights, np.float64)
  centred = np.zeros_like(r)
  const = np.zeros((b, nr), bool)
  groups = [list(range(s, s + group_size)) for s in range(0, b, group_size)]
  for g in groups:
    for k in range(nr):
      vals = r[g, k]
      if vals.max() == vals.min():
        const[g, k] = True
      else:
        centred[g, k] = vals - vals.mean()
  valid = np.ones(b, bool)
  if filt:
    for i in range(b):
      valid[i] = any((not const[i, k]) and w[k] != 0 for k in range(nr))
  adv = np.zeros_like(r)
  for k in range(nr):
    if mode == "grpo":
      for g in groups:
        adv[g, k] = centred[g, k] / (np.std(centred[g, k], ddof=ddof) + eps)
    elif mode == "drgrpo":
      adv[:, k] = centred[:, k]
    elif mode == "batch":
      std = np.std(centred[valid, k], ddof=ddof)
      adv[:, k] = centred[:, k] / (std + eps)
  out = adv @ w
  out[~valid] = 0.0
  return out, valid


def _rewards(seed, b=12, nr=None):
  rng = np.random.default_rng(seed)
  shape = (b,) if nr is None else (b, nr)
  r = rng.normal(size=shape).astype(np.float32)
  # Group 1 (rows 4..7) is binary 0/1 with mixed outcomes; group 2 (rows 8..11) is constant.
  r[4:8] = np.array([1, 0, 0, 1], np.float32).reshape((4,) + (1,) * (r.ndim - 1))
  r[8:12] = 0.7
  return r


@pytest.mark.parametrize("mode", ["grpo", "drgrpo", "batch"])
@pytest.mark.parametrize("filt", [False, True])
@pytest.mark.parametrize("ddof", [0, 1])
def test_single_reward_matches_numpy(mode, filt, ddof):
  r = _rewards(0)
  cfg = AdvantageConfig(mode=mode, filter_zero_variance=filt, std_ddof=ddof)
  adv, valid = jit_advantages(jnp.asarray(r), cfg, 4)
  want_adv, want_valid = np_advantages(r, mode, 4, filt=filt, ddof=ddof)
  chex.assert_shape(adv, (12,))
  chex.assert_trees_all_close(adv, want_adv.astype(np.float32), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(valid), want_valid)
  assert bool(valid[8]) is (not filt)


@pytest.mark.parametrize("mode", ["grpo", "drgrpo", "batch"])
@pytest.mark.parametrize("filt", [False, True])
def test_several_rewards_mixed_with_weights(mode, filt):
  r = _rewards(1, nr=2)
  r[0:4, 1] = 3.0  # group 0 is constant in signal 1 only: still a live group.
  w = np.array([0.5, 2.0], np.float32)
  cfg = AdvantageConfig(mode=mode, filter_zero_variance=filt)
  adv, valid = jit_advantages(jnp.asarray(r), cfg, 4, weights=jnp.asarray(w))
  want_adv, want_valid = np_advantages(r, mode, 4, filt=filt, weights=w)
  chex.assert_trees_all_close(adv, want_adv.astype(np.float32), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(valid), want_valid)
  assert bool(valid[0])


def test_zero_weight_signal_does_not_keep_group_alive():
  r = np.zeros((4, 2), np.float32)
  r[:, 1] = [0, 1, 0, 1]  # only the weight-0 signal varies
  cfg = AdvantageConfig(filter_zero_variance=True)
  adv, valid = jit_advantages(r, cfg, 4, weights=np.array([1.0, 0.0]))
  assert not np.any(np.asarray(valid))
  np.testing.assert_array_equal(np.asarray(adv), 0.0)


def test_grpo_hand_values():
  # mean 0.25, unbiased std 0.5 -> (1-.25)/.5 = 1.5, (0-.25)/.5 = -.5
  adv, _ = compute_advantages(jnp.array([1.0, 0, 0, 0]), AdvantageConfig(eps=0.0), 4)
  chex.assert_trees_all_close(adv, jnp.array([1.5, -0.5, -0.5, -0.5]), rtol=1e-6)
  adv, _ = compute_advantages(jnp.array([1.0, 0, 0, 0]), AdvantageConfig(mode="drgrpo"), 2)
  chex.assert_trees_all_close(adv, jnp.array([0.5, -0.5, 0.0, 0.0]), rtol=1e-6)


def test_constant_group_gives_exact_zero_not_rounding_noise():
  # mean of seven float32 0.1s is not exactly 0.1; a naive (r-mean)/(std+eps) gives O(1) values here.
  r = jnp.full((7,), 0.1, jnp.float32)
  adv, valid = jit_advantages(r, AdvantageConfig(mode="grpo", eps=1e-8), 7)
  np.testing.assert_array_equal(np.asarray(adv), 0.0)
  assert bool(jnp.all(valid))
  _, valid = jit_advantages(r, AdvantageConfig(filter_zero_variance=True), 7)
  assert not bool(jnp.any(valid))


def test_explicit_group_ids_match_contiguous_after_permutation():
  r = _rewards(2)
  perm = np.random.default_rng(0).permutation(12)
  gid = (np.arange(12) // 4)[perm]
  cfg = AdvantageConfig(mode="grpo", filter_zero_variance=True)
  adv, valid = compute_advantages(r[perm], cfg, None, group_id_B=jnp.asarray(gid))
  want, want_valid = compute_advantages(r, cfg, 4)
  chex.assert_trees_all_close(adv, want[perm], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(valid), np.asarray(want_valid)[perm])


def test_jit_and_finite():
  f = jax.jit(compute_advantages, static_argnums=(1, 2))
  r = _rewards(3)
  for mode in ("grpo", "drgrpo", "batch"):
    cfg = AdvantageConfig(mode=mode, filter_zero_variance=True)
    adv, valid = f(jnp.asarray(r), cfg, 4)
    chex.assert_tree_all_finite(adv)
    chex.assert_trees_all_close(adv, compute_advantages(r, cfg, 4)[0], rtol=1e-6)
  # All groups constant: batch std is 0 over no rows; must stay finite.
  adv, valid = f(jnp.ones(8), AdvantageConfig(mode="batch", filter_zero_variance=True), 4)
  chex.assert_tree_all_finite(adv)
  np.testing.assert_array_equal(np.asarray(adv), 0.0)


def test_errors():
  with pytest.raises(ValueError, match=r"mode='gspo'.*grpo"):
    AdvantageConfig(mode="gspo")
  with pytest.raises(ValueError, match=r"B=10 is not divisible by group_size=4"):
    compute_advantages(jnp.zeros(10), AdvantageConfig(), 4)
  with pytest.raises(ValueError, match=r"group_size=1"):
    compute_advantages(jnp.zeros(4), AdvantageConfig(), 1)
  with pytest.raises(ValueError, match=r"weights has shape"):
    compute_advantages(jnp.zeros((4, 2)), AdvantageConfig(), 2, weights=jnp.ones(3))
  with pytest.raises(ValueError, match=r"rewards must be"):
    compute_advantages(jnp.zeros((4, 2, 1)), AdvantageConfig(), 2)
  with pytest.raises(ValueError, match=r"group_id_B values"):
    compute_advantages(jnp.zeros(4), AdvantageConfig(), None, group_id_B=np.array([0, 0, 4, 4]))
