"""Off-policy loss options (truncated IS, GSPO's sequence-level ratio) against a float64 numpy oracle."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exrl.rl.losses import LossConfig, policy_loss

B, T = 6, 5


def np_offpolicy_loss(logp, old, behav, adv, mask, cfg):
  """(loss, dloss/dlogp, tis weights) by loops; PPO clip, token_mean or seq_mean_token_mean aggregation."""
  b, t = logp.shape
  lo, hi = 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high
  n_row = mask.sum(1)
  # ratio per token, and d(log ratio_ij)/d(logp_ik) as a [t, t] matrix per row
  ratio = np.zeros((b, t))
  dlog = np.zeros((b, t, t))
  for i in range(b):
    if cfg.ratio_level == "sequence":
      s = sum(logp[i, j] - old[i, j] for j in range(t) if mask[i, j]) / max(n_row[i], 1)
      for j in range(t):
        if mask[i, j]:
          ratio[i, j] = np.exp(s)
          for k in range(t):
            dlog[i, j, k] = mask[i, k] / n_row[i]
    else:
      for j in range(t):
        if mask[i, j]:
          ratio[i, j] = np.exp(logp[i, j] - old[i, j])
          dlog[i, j, j] = 1.0
  tis = np.ones((b, t))
  if cfg.tis_cap > 0:
    tis = np.minimum(np.exp(old - behav), cfg.tis_cap)
  if cfg.aggregation == "token_mean":
    w = mask / max(mask.sum(), 1)
  else:  # seq_mean_token_mean, each row its own trace
    live = [i for i in range(b) if n_row[i] > 0]
    w = np.array([mask[i] / (n_row[i] * len(live)) if n_row[i] else np.zeros(t) for i in range(b)])
  loss, grad = 0.0, np.zeros((b, t))
  for i in range(b):
    for j in range(t):
      if not mask[i, j]:
        continue
      rho, a = ratio[i, j], adv[i]
      obj = min(rho * a, min(max(rho, lo), hi) * a)
      clipped = (rho < lo and a < 0) or (rho > hi and a > 0)
      loss += -w[i, j] * tis[i, j] * obj
      if not clipped:
        grad[i] += -w[i, j] * tis[i, j] * rho * a * dlog[i, j]
  return loss, grad, tis


def _batch(seed):
  rng = np.random.default_rng(seed)
  behav = -rng.uniform(0.1, 3.0, size=(B, T))
  old = behav + 0.6 * rng.normal(size=(B, T))  # the generator lagged: its log-probs differ from the trainer's
  logp = old + 0.3 * rng.normal(size=(B, T))
  adv = rng.normal(size=(B,))
  mask = (rng.uniform(size=(B, T)) < 0.7).astype(np.float64)
  mask[:, 0] = 1.0
  mask[4] = 0.0
  return logp, old, behav, adv, mask


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("tis_cap", [0.0, 1.5])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_tis_and_gspo_match_numpy(ratio_level, tis_cap, aggregation):
  cfg = LossConfig(ratio_level=ratio_level, tis_cap=tis_cap, aggregation=aggregation, clip_eps_low=0.2,
                   clip_eps_high=0.28)
  for seed in range(3):
    logp, old, behav, adv, mask = (np.asarray(np.float32(x), np.float64) for x in _batch(seed))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    f = lambda lp: policy_loss(lp, f32(old), f32(adv), f32(mask), cfg,
                               behav_logp_BxT=f32(behav) if tis_cap else None)
    (loss, metrics), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(f32(logp))
    want_loss, want_grad, tis = np_offpolicy_loss(logp, old, behav, adv, mask, cfg)
    chex.assert_trees_all_close(loss, np.float32(want_loss), rtol=2e-5, atol=1e-6)
    chex.assert_trees_all_close(grad, want_grad.astype(np.float32), rtol=2e-5, atol=1e-6)
    if tis_cap:
      n = mask.sum()
      np.testing.assert_allclose(metrics["tis_weight_mean"], (tis * mask).sum() / n, rtol=1e-5)
      assert 0 < float(metrics["tis_clip_frac"]) < 1  # the cap binds on some tokens, not all: the test has teeth


def test_gspo_ratio_is_shared_by_a_row():
  logp, old, _, adv, mask = _batch(7)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  _, m_tok = policy_loss(f32(logp), f32(old), f32(adv), f32(mask), LossConfig())
  _, m_seq = policy_loss(f32(logp), f32(old), f32(adv), f32(mask), LossConfig(ratio_level="sequence"))
  want = np.mean([np.exp(((logp[i] - old[i]) * mask[i]).sum() / mask[i].sum())
                  for i in range(B) for _ in range(int(mask[i].sum()))])
  np.testing.assert_allclose(m_seq["ratio_mean"], want, rtol=1e-5)
  assert abs(float(m_tok["ratio_mean"]) - want) > 1e-3  # the two levels really differ on this batch


def test_bad_options_name_the_value():
  with pytest.raises(ValueError, match="ratio_level='row'"):
    LossConfig(ratio_level="row")
  with pytest.raises(ValueError, match="tis_cap=-1"):
    LossConfig(tis_cap=-1)
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="behav_logp_BxT"):
    policy_loss(x, x, jnp.zeros(2), x + 1, LossConfig(tis_cap=2.0))
