"""exrl.rl.losses against a plain-numpy oracle that loops over tokens, traces and groups."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exrl.rl.losses import LossConfig, policy_loss

B, T, G = 6, 5, 3


def np_token_weights(mask, aggregation, trace=None, group=None, constant=None):
  """d(aggregate)/d(loss_bt) for each token, by loops: the loss is sum_bt weight_bt * loss_bt."""
  b, t = mask.shape
  trace = list(range(b)) if trace is None else list(trace)
  wts = np.zeros((b, t))
  if aggregation == "token_mean":
    n = mask.sum()
    if n > 0:
      wts = mask / n
  elif aggregation == "constant":
    c = t if constant is None else constant
    wts = mask / (len(set(trace)) * c)
  else:
    ids = trace if aggregation == "seq_mean_token_mean" else list(group)
    count = {}
    for i in range(b):
      count[ids[i]] = count.get(ids[i], 0.0) + mask[i].sum()
    live = [k for k, v in count.items() if v > 0]
    for i in range(b):
      if count[ids[i]] > 0:
        wts[i] = mask[i] / (count[ids[i]] * len(live))
  return wts


def np_policy_loss(logp, old, adv, mask, cfg, ref=None, exact=None, ent=None, trace=None, group=None):
  """Returns (loss, dloss/dlogp, metrics) computed token by token in float64."""
  b, t = logp.shape
  tok = np.zeros((b, t))
  dtok = np.zeros((b, t))
  pg = np.zeros((b, t))
  ratio = np.zeros((b, t))
  clip_lo = np.zeros((b, t))
  clip_hi = np.zeros((b, t))
  kl = np.zeros((b, t))
  for i in range(b):
    for j in range(t):
      if mask[i, j] == 0:
        continue
      a = adv[i, j] if adv.ndim == 2 else adv[i]
      rho = np.exp(logp[i, j] - old[i, j])
      ratio[i, j] = rho
      if cfg.kind == "ppo":
        lo, hi = 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high
        unclipped, clipped = rho * a, min(max(rho, lo), hi) * a
        obj = min(unclipped, clipped)
        clip_lo[i, j] = rho < lo and a < 0
        clip_hi[i, j] = rho > hi and a > 0
        dobj = 0.0 if (clip_lo[i, j] or clip_hi[i, j]) else rho * a
      else:
        wgt = min(rho, cfg.cispo_eps_max)
        obj = wgt * a * logp[i, j]
        clip_hi[i, j] = rho > cfg.cispo_eps_max
        dobj = wgt * a  # the weight is stop-gradient
      pg[i, j] = -obj
      tok[i, j] = -obj
      dtok[i, j] = -dobj
      if ref is not None:
        d = ref[i, j] - logp[i, j]
        kl[i, j] = np.exp(d) - d - 1
      if exact is not None:
        kl[i, j] = exact[i, j]
      if cfg.kl_beta > 0:
        tok[i, j] += cfg.kl_beta * kl[i, j]
        if cfg.kl_estimator == "k3":
          dtok[i, j] += cfg.kl_beta * (1 - np.exp(ref[i, j] - logp[i, j]))
      if ent is not None:
        tok[i, j] -= cfg.entropy_coef * ent[i, j]
  w = np_token_weights(mask, cfg.aggregation, trace, group, cfg.constant_normalizer)
  n = max(mask.sum(), 1)
  metrics = {
      "pg_loss": (w * pg).sum(),
      "ratio_mean": (ratio * mask).sum() / n,
      "clip_frac_low": (clip_lo * mask).sum() / n,
      "clip_frac_high": (clip_hi * mask).sum() / n,
      "clip_frac": (np.maximum(clip_lo, clip_hi) * mask).sum() / n,
      "approx_kl": ((ratio - 1 - np.log(np.where(mask > 0, ratio, 1))) * mask).sum() / n,
      "num_tokens": mask.sum(),
  }
  if ref is not None or exact is not None:
    metrics["kl"] = (kl * mask).sum() / n
  if ent is not None:
    metrics["entropy"] = (ent * mask).sum() / n
  return (w * tok).sum(), w * dtok, metrics


def _batch(seed, spread=0.3):
  rng = np.random.default_rng(seed)
  old = -rng.uniform(0.1, 3.0, size=(B, T))
  logp = np.minimum(old + spread * rng.normal(size=(B, T)), -1e-3)
  ref = logp + 0.2 * rng.normal(size=(B, T))
  exact = rng.uniform(0.0, 0.5, size=(B, T))
  ent = rng.uniform(0.0, 2.0, size=(B, T))
  adv = rng.normal(size=(B,))
  mask = (rng.uniform(size=(B, T)) < 0.7).astype(np.float64)
  mask[:, 0] = 1.0
  mask[4] = 0.0  # an empty row (e.g. a zero-variance-filtered rollout)
  return dict(logp=logp, old=old, ref=ref, exact=exact, ent=ent, adv=adv, mask=mask)


def _run(cfg, d, trace=None, group=None, use_ref=True, use_exact=False, use_ent=True):
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  kw = dict(ref_logp_BxT=f32(d["ref"]) if use_ref else None,
            exact_kl_BxT=f32(d["exact"]) if use_exact else None,
            entropy_BxT=f32(d["ent"]) if use_ent else None,
            trace_id_B=None if trace is None else jnp.asarray(trace),
            group_id_B=None if group is None else jnp.asarray(group))

  def f(logp):
    return policy_loss(logp, f32(d["old"]), f32(d["adv"]), f32(d["mask"]), cfg, **kw)

  (loss, metrics), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(f32(d["logp"]))
  return loss, metrics, grad


def _check(cfg, d, trace=None, group=None, use_ref=True, use_exact=False, use_ent=True):
  loss, metrics, grad = _run(cfg, d, trace, group, use_ref, use_exact, use_ent)
  # Oracle sees float32-rounded inputs, like the function under test.
  r = lambda x: np.asarray(np.float32(x), np.float64)
  want_loss, want_grad, want_metrics = np_policy_loss(
      r(d["logp"]), r(d["old"]), r(d["adv"]), d["mask"], cfg,
      ref=r(d["ref"]) if use_ref else None, exact=r(d["exact"]) if use_exact else None,
      ent=r(d["ent"]) if use_ent else None, trace=trace, group=group)
  chex.assert_shape(loss, ())
  chex.assert_tree_all_finite((loss, metrics, grad))
  chex.assert_trees_all_close(loss, np.float32(want_loss), rtol=2e-5, atol=1e-6)
  chex.assert_trees_all_close(grad, want_grad.astype(np.float32), rtol=2e-5, atol=1e-6)
  assert set(metrics) == set(want_metrics)
  chex.assert_trees_all_close(
      {k: np.float32(v) for k, v in metrics.items()},
      {k: np.float32(v) for k, v in want_metrics.items()}, rtol=2e-5, atol=1e-6)
  return loss, metrics, grad


TRACE = np.array([0, 0, 1, 2, 3, 3])  # rows 0,1 and rows 4,5 are chunks of one trace each
GROUP = np.arange(B) // G


@pytest.mark.parametrize("kind", ["ppo", "cispo"])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "constant", "prompt"])
def test_loss_and_grad_match_numpy(kind, aggregation):
  cfg = LossConfig(kind=kind, aggregation=aggregation, clip_eps_high=0.28, cispo_eps_max=1.2,
                   kl_beta=0.05, entropy_coef=0.01)
  d = _batch(0)
  trace = TRACE if aggregation in ("seq_mean_token_mean", "constant") else None
  group = GROUP if aggregation == "prompt" else None
  _, metrics, _ = _check(cfg, d, trace=trace, group=group)
  # The data must exercise the clip, or this test could not tell a clip bug apart.
  assert float(metrics["clip_frac"]) > 0


@pytest.mark.parametrize("kind", ["ppo", "cispo"])
def test_per_token_advantages(kind):
  d = _batch(7)
  d["adv"] = np.random.default_rng(7).normal(size=(B, T))
  _check(LossConfig(kind=kind, cispo_eps_max=1.2, kl_beta=0.02), d)


@pytest.mark.parametrize("kind", ["ppo", "cispo"])
def test_exact_kl_and_constant_normalizer(kind):
  cfg = LossConfig(kind=kind, aggregation="constant", constant_normalizer=16.0, kl_beta=0.1,
                   kl_estimator="exact")
  _check(cfg, _batch(1), use_ref=False, use_exact=True, use_ent=False)


def test_exact_kl_gradient_flows_through_kl_input():
  cfg = LossConfig(kl_beta=0.5, kl_estimator="exact", entropy_coef=0.2)
  d = _batch(2)
  m = jnp.asarray(d["mask"], jnp.float32)
  z = jnp.zeros((B, T))

  def f(kl, ent):
    return policy_loss(z, z, jnp.ones(B), m, cfg, exact_kl_BxT=kl, entropy_BxT=ent)[0]

  g_kl, g_ent = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.ones((B, T)), jnp.ones((B, T)))
  n = d["mask"].sum()
  chex.assert_trees_all_close(g_kl, (0.5 * d["mask"] / n).astype(np.float32), rtol=1e-6)
  chex.assert_trees_all_close(g_ent, (-0.2 * d["mask"] / n).astype(np.float32), rtol=1e-6)


def test_cispo_gradient_is_truncated_weight_times_advantage():
  # d loss / d logp = -min(ρ, ε_max) · A · mask / N : the weight is stop-gradient, so no ρ' term.
  cfg = LossConfig(kind="cispo", cispo_eps_max=1.1)
  d = _batch(3, spread=0.5)
  _, _, grad = _run(cfg, d, use_ref=False, use_ent=False)
  lp, old = np.float32(d["logp"]).astype(np.float64), np.float32(d["old"]).astype(np.float64)
  adv = np.float32(d["adv"]).astype(np.float64)
  want = -np.minimum(np.exp(lp - old), 1.1) * adv[:, None] * d["mask"] / d["mask"].sum()
  assert np.any(np.exp(lp - old)[d["mask"] > 0] > 1.1)
  chex.assert_trees_all_close(grad, want.astype(np.float32), rtol=2e-5, atol=1e-7)


def test_clip_higher_asymmetry():
  # ρ = 1.25 > 1+0.2 but < 1+0.28; ρ = 0.78 < 1-0.2.
  old = jnp.zeros((4, 1))
  logp = jnp.log(jnp.array([[1.25], [1.25], [0.78], [0.78]]))
  adv = jnp.array([1.0, -1.0, -1.0, 1.0])
  mask = jnp.ones((4, 1))

  def grads(cfg):
    (loss, m), g = jax.jit(jax.value_and_grad(
        lambda lp: policy_loss(lp, old, adv, mask, cfg), has_aux=True))(logp)
    return np.asarray(g)[:, 0], m

  g_sym, m_sym = grads(LossConfig(clip_eps_low=0.2, clip_eps_high=0.2))
  g_dapo, m_dapo = grads(LossConfig(clip_eps_low=0.2, clip_eps_high=0.28))
  # Symmetric: row 0 (ρ>1.2, A>0) and row 2 (ρ<0.8, A<0) are clipped -> zero gradient.
  np.testing.assert_allclose(g_sym, [0.0, 1.25 / 4, 0.0, -0.78 / 4], rtol=1e-6)
  # Clip-higher: row 0 is inside [0.8, 1.28] and gets gradient -ρA/N; the low side is unchanged.
  np.testing.assert_allclose(g_dapo, [-1.25 / 4, 1.25 / 4, 0.0, -0.78 / 4], rtol=1e-6)
  np.testing.assert_allclose([m_sym["clip_frac_high"], m_sym["clip_frac_low"]], [0.25, 0.25])
  np.testing.assert_allclose([m_dapo["clip_frac_high"], m_dapo["clip_frac_low"]], [0.0, 0.25])


@pytest.mark.parametrize("kind", ["ppo", "cispo"])
def test_first_epoch_ratio_is_one(kind):
  # logp == old_logp: ρ = 1 exactly, nothing clipped, gradient -A·mask/N.
  d = _batch(4)
  cfg = LossConfig(kind=kind)
  lp = jnp.asarray(d["logp"], jnp.float32)
  m = jnp.asarray(d["mask"], jnp.float32)
  adv = jnp.asarray(d["adv"], jnp.float32)
  (loss, metrics), g = jax.jit(jax.value_and_grad(
      lambda x: policy_loss(x, lp, adv, m, cfg), has_aux=True))(lp)
  assert float(metrics["ratio_mean"]) == 1.0
  assert float(metrics["clip_frac"]) == 0.0 and float(metrics["approx_kl"]) == 0.0
  want = -np.asarray(adv)[:, None] * d["mask"] / d["mask"].sum()
  chex.assert_trees_all_close(g, want.astype(np.float32), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["ppo", "cispo"])
def test_packed_trace_equals_concatenated_row(kind):
  """Two chunk rows with one trace id give the same loss and grads as one row holding both."""
  rng = np.random.default_rng(5)
  lp2 = -rng.uniform(0.1, 2, size=(2, 2 * T)).astype(np.float32)
  old2 = (lp2 + 0.3 * rng.normal(size=lp2.shape)).astype(np.float32)
  m2 = (rng.uniform(size=lp2.shape) < 0.8).astype(np.float32)
  m2[1, T:] = 0  # trace 1 is short and fits one chunk
  adv2 = np.array([0.7, -1.3], np.float32)
  cfg = LossConfig(kind=kind, aggregation="seq_mean_token_mean", cispo_eps_max=1.2)
  # Packed: trace 0 split into two rows of width T; trace 1 in one row.
  split = lambda x: np.stack([x[0, :T], x[0, T:], x[1, :T]])
  lp3, old3, m3 = split(lp2), split(old2), split(m2)
  adv3 = adv2[[0, 0, 1]]

  def f(lp, old, adv, m, trace):
    return policy_loss(lp, old, adv, m, cfg, trace_id_B=trace)

  vg = jax.jit(jax.value_and_grad(f, has_aux=True))
  (l2, mt2), g2 = vg(lp2, old2, adv2, m2, None)
  (l3, mt3), g3 = vg(lp3, old3, adv3, m3, jnp.array([0, 0, 1]))
  chex.assert_trees_all_close(l3, l2, rtol=1e-6)
  chex.assert_trees_all_close(mt3, mt2, rtol=1e-6)
  chex.assert_trees_all_close(split(np.asarray(g2)), g3, rtol=1e-6)
  # Not the same as treating the chunks as separate sequences.
  (l_sep, _), _ = vg(lp3, old3, adv3, m3, None)
  assert abs(float(l_sep) - float(l2)) > 1e-4


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "constant", "prompt"])
def test_empty_mask_and_garbage_padding_are_finite(aggregation):
  cfg = LossConfig(aggregation=aggregation, kl_beta=0.1, entropy_coef=0.01)
  z = jnp.zeros((B, T))
  garbage = jnp.full((B, T), -1e30)  # padding log-probs can be anything
  huge = jnp.full((B, T), 1e30)

  def f(lp):
    return policy_loss(lp, huge, jnp.ones(B), z, cfg, ref_logp_BxT=huge, entropy_BxT=garbage,
                       group_id_B=jnp.asarray(GROUP))

  (loss, metrics), g = jax.jit(jax.value_and_grad(f, has_aux=True))(garbage)
  chex.assert_tree_all_finite((loss, metrics, g))
  assert float(loss) == 0.0 and float(metrics["num_tokens"]) == 0.0
  # One real token among garbage: only it counts.
  m = z.at[0, 0].set(1.0)
  lp = garbage.at[0, 0].set(-1.0)
  old = huge.at[0, 0].set(-1.0)
  loss, metrics = policy_loss(lp, old, jnp.ones(B), m, LossConfig(aggregation=aggregation),
                              group_id_B=jnp.asarray(GROUP))
  chex.assert_tree_all_finite((loss, metrics))
  assert float(metrics["ratio_mean"]) == 1.0


def test_jit_compiles_once_per_shape_across_ids():
  traces = []
  cfg = LossConfig(aggregation="prompt")

  @functools.partial(jax.jit, static_argnames="cfg")
  def f(lp, old, adv, m, gid, cfg):
    traces.append(1)
    return policy_loss(lp, old, adv, m, cfg, group_id_B=gid)[0]

  d = _batch(6)
  args = [jnp.asarray(d[k], jnp.float32) for k in ("logp", "old", "adv", "mask")]
  a = f(*args, jnp.asarray(GROUP), cfg=cfg)
  b = f(*args, jnp.array([0, 0, 1, 1, 2, 2]), cfg=cfg)
  assert len(traces) == 1
  assert abs(float(a) - float(b)) > 1e-6


def test_errors():
  with pytest.raises(ValueError, match=r"kind='reinforce'.*ppo"):
    LossConfig(kind="reinforce")
  with pytest.raises(ValueError, match=r"kl_estimator='k2'.*k3"):
    LossConfig(kl_estimator="k2")
  with pytest.raises(ValueError, match=r"aggregation='sum'.*token_mean"):
    LossConfig(aggregation="sum")
  with pytest.raises(ValueError, match=r"clip_eps_low"):
    LossConfig(clip_eps_low=1.5)
  z = jnp.zeros((2, 3))
  adv = jnp.zeros(2)
  with pytest.raises(ValueError, match=r"ref_logp_BxT"):
    policy_loss(z, z, adv, z, LossConfig(kl_beta=0.1))
  with pytest.raises(ValueError, match=r"exact_kl_BxT"):
    policy_loss(z, z, adv, z, LossConfig(kl_beta=0.1, kl_estimator="exact"))
  with pytest.raises(ValueError, match=r"group_id_B"):
    policy_loss(z, z, adv, z, LossConfig(aggregation="prompt"))
  with pytest.raises(ValueError, match=r"entropy_BxT"):
    policy_loss(z, z, adv, z, LossConfig(entropy_coef=0.01))
  with pytest.raises(ValueError, match=r"mask_BxT has shape"):
    policy_loss(z, z, adv, jnp.zeros((2, 4)), LossConfig())
  with pytest.raises(ValueError, match=r"adv_B has shape"):
    policy_loss(z, z, jnp.zeros(3), z, LossConfig())
  with pytest.raises(ValueError, match=r"trace_id_B values"):
    policy_loss(z, z, adv, z, LossConfig(aggregation="seq_mean_token_mean"),
                trace_id_B=np.array([0, 2]))
