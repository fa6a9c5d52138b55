"""The sharded train step against an unsharded run, gradient accumulation, and non-finite skipping."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.rl.losses import LossConfig
from exrl.infra import mesh as mesh_lib
from exrl.train.experience import pack_microbatches
from exrl.train.objectives import rl_loss_fn, sft_loss_fn
from exrl.train.trainer import setup_state
from exrl.train.state import OptimConfig, init_state, make_optimizer
from exrl.train.step import make_train_step, shard_batch

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, model_type="qwen2", qkv_bias=True)
G = 4


def _rows(B=16, T=12, seed=0):
  rng = np.random.default_rng(seed)
  prompt = 4
  lengths = rng.integers(2, T - prompt + 1, B)
  tokens = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
  valid = np.zeros((B, T), bool)
  loss_mask = np.zeros((B, T), np.float32)
  for i, n in enumerate(lengths):
    valid[i, :prompt + n] = True
    loss_mask[i, prompt:prompt + n] = 1
  return {"tokens": tokens, "valid": valid, "positions": np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32),
          "loss_mask": loss_mask, "old_logp": (-3 + 0.3 * rng.standard_normal((B, T))).astype(np.float32) * loss_mask,
          "ref_logp": (-3 + 0.3 * rng.standard_normal((B, T))).astype(np.float32) * loss_mask,
          "adv": rng.standard_normal(B).astype(np.float32), "trace_id": np.arange(B, dtype=np.int32),
          "group_id": (np.arange(B) // G).astype(np.int32)}


def _run(loss_cfg, M, rows=None, steps=1):
  """The unsharded oracle: plain jit on one device. (Adam eps=1e-4 keeps the update smooth in g, so
  reduction-order noise in the gradient stays below the 1e-5 tolerance.)"""
  params = decoder.init_params(CFG, jax.random.key(0))
  opt = make_optimizer(OptimConfig(lr=1e-2, warmup_frac=0.0, eps=1e-4), 10)
  state = init_state(params, opt, seed=0)
  step = make_train_step(rl_loss_fn(CFG, loss_cfg), opt)
  batch = jax.tree.map(jnp.asarray, pack_microbatches(rows or _rows(), M))
  ref = decoder.init_params(CFG, jax.random.key(1))
  for _ in range(steps):
    state, metrics = step(state, batch, ref)
  return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (8, 1, 1), (2, 2, 2)])
def test_sharded_step_matches_unsharded(mesh_shape):
  loss_cfg = LossConfig(kl_beta=0.1, aggregation="seq_mean_token_mean")
  want_params, want = _run(loss_cfg, M=1)
  data, fsdp, tensor = mesh_shape
  devices = jax.devices()[: data * fsdp * tensor]
  mesh_cfg = mesh_lib.MeshConfig(data, fsdp, tensor)
  got_params, got = _run_on(loss_cfg, mesh_cfg, devices)
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got_params, want_params, atol=1e-5, rtol=1e-5)


def _run_on(loss_cfg, mesh_cfg, devices):
  params = decoder.init_params(CFG, jax.random.key(0))
  opt = make_optimizer(OptimConfig(lr=1e-2, warmup_frac=0.0, eps=1e-4), 10)
  mesh = mesh_lib.make_mesh(mesh_cfg, devices)
  state, sh = setup_state(CFG, params, opt, 0, mesh)
  ref = jax.device_put(decoder.init_params(CFG, jax.random.key(1)), sh.params)
  step = make_train_step(rl_loss_fn(CFG, loss_cfg), opt, mesh, sh, sh.params)
  if mesh.shape["tensor"] > 1:  # the params really are split over the tensor axis
    assert not state.params["embed"].sharding.is_fully_replicated
  state, metrics = step(state, shard_batch(pack_microbatches(_rows(), 1), mesh), ref)
  return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "prompt", "constant"])
def test_gradient_accumulation_equals_full_batch(aggregation):
  loss_cfg = LossConfig(aggregation=aggregation, constant_normalizer=8.0)
  p1, m1 = _run(loss_cfg, M=1)
  p4, m4 = _run(loss_cfg, M=4)
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(p4, p1, atol=1e-5, rtol=1e-5)


def test_nonfinite_update_is_skipped():
  rows = _rows()
  rows["adv"][3] = np.nan
  params0 = jax.device_get(decoder.init_params(CFG, jax.random.key(0)))
  params, metrics = _run(LossConfig(), M=1, rows=rows, steps=2)
  assert metrics["skipped"] == 1 and metrics["skipped_in_row"] == 2
  chex.assert_trees_all_equal(params, params0)


def test_sft_loss_is_completion_nll():
  """The SFT loss equals a numpy NLL over completion tokens, computed from the full logits."""
  rows = _rows()
  params = decoder.init_params(CFG, jax.random.key(0))
  mb = jax.tree.map(jnp.asarray, rows)
  loss, weight, _ = sft_loss_fn(CFG)(params, None, mb)
  z = np.asarray(decoder.logits(CFG, params, mb["tokens"], mb["valid"], mb["positions"]), np.float64)
  logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
  tgt = rows["tokens"][:, 1:]
  lp = np.take_along_axis(logp[:, :-1], tgt[..., None], -1)[..., 0]
  m = rows["loss_mask"][:, 1:]
  np.testing.assert_allclose(loss, -(lp * m).sum() / m.sum(), rtol=1e-5)
  assert weight == m.sum()


def test_bad_batch_for_mesh():
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(8, 1, 1))
  batch = pack_microbatches(_rows(B=12), 1)
  with pytest.raises(ValueError, match="not divisible by data\\*fsdp=8"):
    shard_batch(batch, mesh)
  with pytest.raises(ValueError, match="does not fit 8 devices"):
    mesh_lib.make_mesh(mesh_lib.MeshConfig(3, 1, 1))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_on_policy_loss_equals_rescored_old_logp(temperature):
  """One inner epoch: the loss's own detached log-probs as old log-probs give the loss and gradient of the
  path that re-scores the rollout first (ratio 1), without that extra forward."""
  from exrl.train.experience import score
  rows = _rows()
  params = decoder.init_params(CFG, jax.random.key(0))
  ref = decoder.init_params(CFG, jax.random.key(1))
  mb = jax.tree.map(jnp.asarray, rows)
  scored = score(CFG, params, ref, mb["tokens"], mb["valid"], mb["positions"], mb["loss_mask"], with_ref=False,
                 temperature=temperature)
  rescored = dict(mb, old_logp=scored["logp"])
  loss_cfg = LossConfig(kl_beta=0.1, aggregation="seq_mean_token_mean")
  on = rl_loss_fn(CFG, loss_cfg, on_policy=True, temperature=temperature)
  off = rl_loss_fn(CFG, loss_cfg, temperature=temperature)
  (l_on, _), g_on = jax.value_and_grad(lambda p: on(p, ref, mb)[:2], has_aux=True)(params)
  (l_off, _), g_off = jax.value_and_grad(lambda p: off(p, ref, rescored)[:2], has_aux=True)(params)
  np.testing.assert_allclose(l_on, l_off, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(g_on, g_off, rtol=1e-5, atol=1e-6)
  # The oracle can fail: with the rows' own (random) old log-probs the loss differs.
  assert abs(float(off(params, ref, mb)[0]) - float(l_on)) > 1e-3


def test_memory_plan_counts_params_adam_moments_and_reference():
  # Oracle: parameter count from the shapes (numpy), Adam keeps two fp32 moments per parameter.
  from exrl.train.trainer import format_plan, memory_plan
  params = decoder.init_params(CFG, jax.random.key(0))
  n = sum(int(np.prod(s)) for s in jax.tree.leaves(decoder.param_shapes(CFG), is_leaf=lambda x: isinstance(x, tuple)))
  state = init_state(params, make_optimizer(OptimConfig(), 10), 0)
  plan = memory_plan(state, frozen=jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
  assert plan["params"] == plan["gradients"] == 4 * n
  assert 8 * n <= plan["optimizer"] <= 8 * n + 64  # + optax's step counters
  assert plan["reference"] == 2 * n
  assert plan["total"] == sum(v for k, v in plan.items() if k != "total")
  assert "reference" not in format_plan(memory_plan(state), mesh_lib.make_mesh(mesh_lib.MeshConfig()))


def test_update_runs_in_place_and_remat_auto():
  # Compiled temp bytes: the whole step needs at most 0.5x params more than the gradient alone (the old
  # select-of-(new, old) skip kept a second params + optimizer copy: +1.2x); remat cuts the activations.
  from exrl.train.step import train_step
  from exrl.train.trainer import resolve_remat
  cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=32, model_type="qwen2", qkv_bias=True)
  opt = make_optimizer(OptimConfig(), 10)
  params = jax.eval_shape(lambda: decoder.init_params(cfg, jax.random.key(0)))
  state = jax.eval_shape(lambda p: init_state(p, opt, 0), params)
  rows = {k: jax.ShapeDtypeStruct((1, 32, 64) if v.ndim == 2 else (1, 32), v.dtype) for k, v in _rows().items()}
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))

  def temp(fn):
    return jax.jit(fn, donate_argnums=0).lower(state, rows, params).compile().memory_analysis().temp_size_in_bytes

  grad_temps = []
  for remat in (False, True):
    loss_fn = rl_loss_fn(cfg, LossConfig(), on_policy=True, remat=remat)
    grad_only = temp(lambda s, b, f: jax.grad(lambda p: loss_fn(p, f, jax.tree.map(lambda x: x[0], b))[0])(s.params))
    step = temp(lambda s, b, f: train_step(s, b, f, loss_fn=loss_fn, optimizer=opt))
    assert step <= grad_only + 0.5 * nbytes, (remat, step / nbytes, grad_only / nbytes)
    grad_temps.append(grad_only)
  assert grad_temps[1] < 0.75 * grad_temps[0], grad_temps
  assert resolve_remat(None, cfg) is False and resolve_remat(True, cfg) is True
  big = ModelConfig(vocab_size=16384, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                    num_kv_heads=2, head_dim=64)  # Qwen2.5-0.5B's layout: 373M parameters
  assert resolve_remat(None, big) is True and resolve_remat(False, big) is False
