"""Accelerator lowering on a CPU-only machine: jax.export for platforms tpu and cuda.

What this proves: the sharded RL train step (on an abstract 2x2x2 data/fsdp/tensor mesh), the sampler and the
Pallas token-stats kernels (forward and both backward kernels, ragged shapes, TPU only) trace and lower to
StableHLO (Mosaic custom calls for Pallas) for that platform, with the shardings in the module. It fails with
the lowering error if anyone adds an op with no lowering rule for the platform, a CPU-only custom call, or a
sharding that does not fit the mesh. It does NOT prove the final XLA/Mosaic/PTX compile, numerics on the device,
memory fit, or speed.
"""
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.rl.losses import LossConfig
from exrl.rollout import sampler
from exrl.infra import mesh as mesh_lib
from exrl.train.objectives import rl_loss_fn
from exrl.train.state import OptimConfig, init_state, make_optimizer
from exrl.train.step import make_train_step, microbatch_sharding
from exrl.kernels import pallas

CFG = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, model_type="qwen2", qkv_bias=True, max_position_embeddings=64)
PLATFORMS = ["tpu", "cuda"]
MESH = AbstractMesh((2, 2, 2), mesh_lib.AXES, axis_types=(AxisType.Auto,) * 3)


def _abstract(tree_shape, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree_shape, shardings)


def _param_shardings():
  params = jax.eval_shape(lambda: decoder.init_params(CFG, jax.random.key(0)))
  return params, mesh_lib.param_shardings(params, decoder.param_axes(CFG), MESH)


def _check_module(exp, platform, n_devices):
  assert exp.platforms == (platform,)
  assert exp.nr_devices == n_devices
  text = exp.mlir_module()
  if n_devices > 1:
    assert '"data"=2, "fsdp"=2, "tensor"=2' in text  # the sharded mesh made it into the module
  assert exp.mlir_module_serialized  # StableHLO bytecode: the artifact a device would compile
  return text


@pytest.mark.parametrize("platform", PLATFORMS)
def test_sharded_rl_train_step_lowers(platform):
  opt = make_optimizer(OptimConfig(), 10)
  params, psh = _param_shardings()
  state = jax.eval_shape(lambda p: init_state(p, opt, 0), params)
  rep = NamedSharding(MESH, P())
  # AdamW moments shard like their params; counters, step and key are replicated.
  opt_sh = optax.tree_map_params(opt, lambda _, s: s, state.opt_state, psh, transform_non_params=lambda _: rep,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))
  state_sh = jax.tree.map(lambda _: rep, state).replace(params=psh, opt_state=opt_sh)
  M, B, T = 2, 8, 16
  fields = {"tokens": (jnp.int32, (M, B, T)), "valid": (jnp.bool_, (M, B, T)), "positions": (jnp.int32, (M, B, T)),
            "loss_mask": (jnp.float32, (M, B, T)), "old_logp": (jnp.float32, (M, B, T)),
            "ref_logp": (jnp.float32, (M, B, T)), "adv": (jnp.float32, (M, B)), "trace_id": (jnp.int32, (M, B)),
            "group_id": (jnp.int32, (M, B))}
  batch = {k: jax.ShapeDtypeStruct(s, d, sharding=microbatch_sharding(MESH, len(s))) for k, (d, s) in fields.items()}
  loss_fn = rl_loss_fn(CFG, LossConfig(kl_beta=0.05, aggregation="prompt", kind="cispo"),
                       implementation="xla")
  step = make_train_step(loss_fn, opt, MESH, state_sh, psh)
  exp = jax.export.export(step, platforms=[platform])(_abstract(state, state_sh), batch, _abstract(params, psh))
  text = _check_module(exp, platform, 8)
  assert '{"tensor"}' in text  # vocab / heads / mlp really are split over the tensor axis


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("sampling", [sampler.SamplingConfig(max_new_tokens=4, temperature=0.7, top_k=8, top_p=0.9,
                                                             stop_token_ids=(2,)),
                                      sampler.SamplingConfig(max_new_tokens=4, greedy=True)], ids=["topk_topp", "greedy"])
def test_sampler_lowers(platform, sampling):
  params, psh = _param_shardings()
  B, Pn = 8, 8
  rows = NamedSharding(MESH, P(mesh_lib.BATCH_AXES, None))

  def fn(params, tokens, valid, key_data):
    out = sampler.generate(CFG, sampling, params, tokens, valid, jax.random.wrap_key_data(key_data))
    return out.tokens_BxN, out.logp_BxN, out.lengths_B

  exp = jax.export.export(jax.jit(fn), platforms=[platform])(
      _abstract(params, psh), jax.ShapeDtypeStruct((B, Pn), jnp.int32, sharding=rows),
      jax.ShapeDtypeStruct((B, Pn), jnp.bool_, sharding=rows),
      jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(MESH, P())))
  text = _check_module(exp, platform, 8)
  assert "stablehlo.while" in text  # the decode loop stays a device loop


@pytest.mark.parametrize("with_ref", [False, True])
def test_pallas_token_stats_lowers_to_mosaic_for_tpu(with_ref):
  n, d, v = 37, 16, 300  # ragged: neither 37 nor 300 is a multiple of its block

  def loss(h, w, t, rh, rw):
    s = pallas.token_stats(h, w, t, ref_hidden_NxD=rh, ref_w_DxV=rw, temperature=0.9, block_n=8, block_v=128,
                           interpret=False)
    terms = [s.logp, s.entropy, s.self_certainty] + ([s.kl] if with_ref else [])
    return sum(jnp.sum(x) for x in terms)

  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  args = (f32(n, d), f32(d, v), jax.ShapeDtypeStruct((n,), jnp.int32),
          f32(n, d) if with_ref else None, f32(d, v) if with_ref else None)
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  exp = jax.export.export(grad, platforms=["tpu"])(*args)
  text = _check_module(exp, "tpu", 1)
  # forward + dhidden + dW kernels, each a Mosaic custom call
  assert text.count("tpu_custom_call") >= 3, text.count("tpu_custom_call")
  for name in ("token_stats_fwd", "token_stats_dh", "token_stats_dw"):
    assert name in text


def test_pallas_tpu_kernel_does_not_claim_cuda():
  # The oracle that the checks above can fail: a Mosaic TPU kernel has no CUDA lowering.
  f = jax.jit(lambda h, w, t: pallas.token_stats(h, w, t, block_n=8, block_v=128, interpret=False).logp)
  args = (jax.ShapeDtypeStruct((16, 8), jnp.float32), jax.ShapeDtypeStruct((8, 256), jnp.float32),
          jax.ShapeDtypeStruct((16,), jnp.int32))
  with pytest.raises(Exception):
    jax.export.export(f, platforms=["cuda"])(*args)
