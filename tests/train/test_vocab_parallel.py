"""Tensor-parallel token statistics in the train step (8 forced CPU devices).

With mesh tensor > 1, the RL and SFT losses given the mesh route the LM-head statistics through
`kernels.sharded` (shard_map): each device streams only its V/tensor columns. The oracle is the same step
jitted on one device with no mesh. The last test compares the compiled collective bytes of the two paths.
"""
import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.rl.losses import LossConfig
from exrl.infra import mesh as mesh_lib
from exrl.train.experience import pack_microbatches
from exrl.train.objectives import rl_loss_fn, sft_loss_fn, vocab_parallel
from exrl.train.state import OptimConfig, init_state, make_optimizer
from exrl.train.step import make_train_step, shard_batch
from exrl.train.trainer import setup_state
from exrl.kernels import pallas as kernels_pallas

G = 4
# ScaleRL's loss (CISPO, prompt aggregation) plus the exact KL and an entropy bonus, so every statistic the
# merge produces (logp, lse, entropy, kl) carries gradient.
LOSS = LossConfig(kind="cispo", aggregation="prompt", kl_beta=0.1, kl_estimator="exact", entropy_coef=0.01)


def _cfg(vocab_size=256):
  return ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, model_type="qwen2", qkv_bias=True)


def _rows(cfg, B=16, T=12, seed=0):
  rng = np.random.default_rng(seed)
  prompt = 4
  tokens = rng.integers(1, cfg.vocab_size, (B, T)).astype(np.int32)
  valid = np.zeros((B, T), bool)
  loss_mask = np.zeros((B, T), np.float32)
  for i, n in enumerate(rng.integers(2, T - prompt + 1, B)):
    valid[i, :prompt + n] = True
    loss_mask[i, prompt:prompt + n] = 1
  return {"tokens": tokens, "valid": valid, "positions": np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32),
          "loss_mask": loss_mask, "old_logp": (-5 + 0.3 * rng.standard_normal((B, T))).astype(np.float32) * loss_mask,
          "ref_logp": np.zeros((B, T), np.float32), "adv": rng.standard_normal(B).astype(np.float32),
          "trace_id": np.arange(B, dtype=np.int32), "group_id": (np.arange(B) // G).astype(np.int32)}


def _opt():
  return make_optimizer(OptimConfig(lr=1e-2, warmup_frac=0.0, eps=1e-4), 10)


def _unsharded(cfg, loss_fn, frozen):
  params = decoder.init_params(cfg, jax.random.key(0))
  state = init_state(params, _opt(), seed=0)
  state, metrics = make_train_step(loss_fn, _opt())(state, jax.tree.map(jnp.asarray, pack_microbatches(_rows(cfg), 1)),
                                                   frozen)
  return jax.device_get(state.params), jax.device_get(metrics)


def _sharded_step(cfg, mesh_shape, make_loss, with_ref):
  """(jitted step, state, batch, frozen) on a mesh; make_loss(mesh) builds the loss function."""
  data, fsdp, tensor = mesh_shape
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data, fsdp, tensor), jax.devices()[:data * fsdp * tensor])
  state, sh = setup_state(cfg, decoder.init_params(cfg, jax.random.key(0)), _opt(), 0, mesh)
  frozen = jax.device_put(decoder.init_params(cfg, jax.random.key(1)), sh.params) if with_ref else None
  step = make_train_step(make_loss(mesh), _opt(), mesh, sh, sh.params if with_ref else None)
  return step, state, shard_batch(pack_microbatches(_rows(cfg), 1), mesh), frozen


@pytest.mark.parametrize("mesh_shape,implementation", [((2, 2, 2), "xla"), ((1, 1, 8), "xla"), ((2, 2, 2), "pallas")])
def test_rl_step_vocab_parallel_equals_unsharded(mesh_shape, implementation):
  """pallas: the interpret-mode kernels under shard_map's unchecked mode (exrl/kernels/sharded.py says why)."""
  cfg = _cfg()
  want_params, want = _unsharded(cfg, rl_loss_fn(cfg, LOSS, implementation="xla"),
                                 decoder.init_params(cfg, jax.random.key(1)))
  step, state, batch, frozen = _sharded_step(
      cfg, mesh_shape, lambda m: rl_loss_fn(cfg, LOSS, mesh=m, implementation=implementation), True)
  assert "shard_map" in str(step.trace(state, batch, frozen).jaxpr)  # the vocab-parallel path is the one taken
  state, got = step(state, batch, frozen)
  for k in ("loss", "entropy", "self_certainty", "grad_norm"):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  chex.assert_trees_all_close(jax.device_get(state.params), want_params, atol=1e-5, rtol=1e-5)


def test_sft_step_vocab_parallel_equals_unsharded():
  cfg = _cfg()
  want_params, want = _unsharded(cfg, sft_loss_fn(cfg), None)
  step, state, batch, _ = _sharded_step(cfg, (2, 1, 4), lambda m: sft_loss_fn(cfg, mesh=m), False)
  assert "shard_map" in str(step.trace(state, batch, None).jaxpr)
  state, got = step(state, batch, None)
  np.testing.assert_allclose(got["nll"], want["nll"], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jax.device_get(state.params), want_params, atol=1e-5, rtol=1e-5)


def test_vocab_parallel_only_when_the_vocab_splits_over_tensor():
  mesh = lambda d, f, t: mesh_lib.make_mesh(mesh_lib.MeshConfig(d, f, t), jax.devices()[:d * f * t])
  assert vocab_parallel(mesh(2, 2, 2), 256)
  assert not vocab_parallel(mesh(2, 2, 2), 255)  # the param rules leave such a vocab replicated too
  assert not vocab_parallel(mesh(4, 2, 1), 256)
  assert not vocab_parallel(None, 256)


@pytest.mark.parametrize("platform,implementation", [("tpu", "xla"), ("tpu", "pallas"), ("cuda", "xla")])
def test_vocab_parallel_loss_lowers_for_accelerators(platform, implementation, monkeypatch):
  """jax.export of the loss gradient on an abstract 2x2x2 mesh (see tests/test_lowering.py for what that proves);
  the Pallas kernels compiled (Mosaic), not interpreted as they would be by default off TPU."""
  monkeypatch.setattr(kernels_pallas, "token_stats", functools.partial(kernels_pallas.token_stats, interpret=False))
  mesh = AbstractMesh((2, 2, 2), mesh_lib.AXES, axis_types=(AxisType.Auto,) * 3)
  cfg = _cfg()
  params = jax.eval_shape(lambda: decoder.init_params(cfg, jax.random.key(0)))
  psh = mesh_lib.param_shardings(params, decoder.param_axes(cfg), mesh)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, psh)
  rows = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, P(mesh_lib.BATCH_AXES)))
          for k, v in _rows(cfg).items()}
  fn = rl_loss_fn(cfg, LOSS, implementation=implementation, mesh=mesh)
  grad = jax.jit(jax.grad(lambda p, f, mb: fn(p, f, mb)[0]))
  text = jax.export.export(grad, platforms=[platform])(params, params, rows).mlir_module()
  assert "sdy.manual_computation" in text or "shard_map" in text  # the vocab-parallel region made it in
  assert text.count("tpu_custom_call") >= 3 if implementation == "pallas" else "tpu_custom_call" not in text


# ---------------------------------------------------------------------------------------------- HLO bytes

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+) \(.*\{\s*$")


def _shape_bytes(shape: str) -> int:
  return sum(_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
             for d, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape) if d in _DTYPE_BYTES)


def _balanced(text: str, start: int) -> int:
  """Index of the ')' closing the '(' at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += (text[i] == "(") - (text[i] == ")")
    if depth == 0:
      return i
  raise ValueError(f"unbalanced parentheses in {text[:80]!r}")


def collective_bytes(hlo_text: str) -> dict:
  """Per-device bytes of the operands of every collective in a compiled (SPMD-partitioned) HLO module; a while
  body counts (known trip count) times. Compiled HLO prints operands by name, so shapes are looked up."""
  shapes, comps, entry, cur = {}, {}, None, None
  for line in hlo_text.splitlines():
    if h := _HEADER.match(line):
      cur = h.group(1)
      comps[cur] = []
      entry = cur if line.startswith("ENTRY") else entry
    elif (m := _INSTR.match(line)) and cur is not None:
      rest = m.group(2)
      cut = _balanced(rest, 0) + 1 if rest.startswith("(") else rest.index(" ")  # tuple or array shape
      shapes[m.group(1)] = rest[:cut]
      comps[cur].append(rest[cut:].strip())
  calls = {c: [] for c in comps}
  for c, instrs in comps.items():
    for tail in instrs:
      if tail.startswith("while("):
        n = re.search(r'"known_trip_count":\{"n":"(\d+)"', tail)
        calls[c].append((re.search(r"body=%([\w.\-]+)", tail).group(1), int(n.group(1)) if n else 1))
      calls[c] += [(callee, 1) for callee in re.findall(r"(?:calls|to_apply|true_computation|false_computation)"
                                                        r"=%([\w.\-]+)", tail)]
      for group in re.findall(r"branch_computations=\{([^}]*)\}", tail):
        calls[c] += [(b, 1) for b in re.findall(r"%([\w.\-]+)", group)]
  weight = {}

  def visit(c, w):
    weight[c] = weight.get(c, 0) + w
    for callee, f in calls.get(c, ()):
      visit(callee, w * f)

  visit(entry, 1)
  out = dict.fromkeys(COLLECTIVES, 0)
  for c, instrs in comps.items():
    for tail in instrs:
      op = tail.split("(", 1)[0].removesuffix("-start")
      if op in out:
        start = tail.index("(")
        operands = re.findall(r"%([\w.\-]+)", tail[start:_balanced(tail, start)])
        out[op] += weight.get(c, 0) * sum(_shape_bytes(shapes[a]) for a in operands)
  out["total"] = sum(out.values())
  return out


def test_collective_bytes_parser_on_a_known_module():
  """The parser against hand-counted bytes: a psum of f32[8, 4] per device inside a 3-trip loop."""
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))

  def f(a):
    def body(_, a):
      return jax.shard_map(lambda b: jax.lax.psum(b, "x") * 0.5, mesh=mesh, in_specs=jax.P("x"),
                           out_specs=jax.P("x"))(a)
    return jax.lax.fori_loop(0, 3, body, a)

  a = jax.device_put(jnp.ones((64, 4)), jax.NamedSharding(mesh, jax.P("x")))
  got = collective_bytes(jax.jit(f).lower(a).compile().as_text())
  assert got["all-reduce"] == 3 * 8 * 4 * 4 and got["total"] == got["all-reduce"], got


def test_vocab_parallel_moves_fewer_collective_bytes():
  """Compiled RL step on mesh data=2, fsdp=2, tensor=2 with V=4096: per-device collective operand bytes of the
  XLA-partitioned statistics vs the shard_map vocab-parallel ones (README quotes the printed numbers)."""
  cfg = _cfg(4096)
  loss = LossConfig()
  got = {}
  for name, use_mesh in (("xla_partitioned", False), ("vocab_parallel", True)):
    step, state, batch, _ = _sharded_step(cfg, (2, 2, 2), lambda m: rl_loss_fn(cfg, loss, mesh=m if use_mesh else None),
                                          False)
    got[name] = collective_bytes(step.lower(state, batch, None).compile().as_text())
  print({k: v["total"] for k, v in got.items()}, got)
  assert got["vocab_parallel"]["total"] < got["xla_partitioned"]["total"] / 2, got
