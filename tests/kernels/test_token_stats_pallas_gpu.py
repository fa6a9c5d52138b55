"""kernels.pallas_gpu (Triton-backend Pallas) in interpret mode on CPU against the reference, and lowered for CUDA.

The CUDA lowering runs Pallas's Triton lowering on this CPU-only machine: the kernels become Triton IR inside
`__gpu$xla.gpu.triton` custom calls. jax.export refuses to serialise that target by default (it has no compatibility
guarantee), so the export disables exactly that check. It proves the kernels lower for CUDA (every in-kernel array a
power of 2, every op with a Triton rule); it does NOT prove the PTX compile, numerics on a GPU, or speed.
"""
import chex
import jax
import jax.numpy as jnp
import pytest

from exrl import kernels
from exrl.kernels import pallas_gpu, reference
from token_stats_oracle import make_inputs, numpy_stats, stats_and_grads

RTOL, ATOL = 1e-5, 1e-6
TRITON = "__gpu$xla.gpu.triton"


def _check(n, d, v, blocks, with_ref, seed=0, temperature=0.8, dtype=jnp.float32, rtol=RTOL, atol=ATOL):
  h, w, t, ref = make_inputs(seed, n, d, v, with_ref=with_ref, dtype=dtype)
  bn, bv, bd = blocks
  got, g_got = stats_and_grads(pallas_gpu.token_stats, h, w, t, ref, temperature=temperature, block_n=bn,
                               block_v=bv, block_d=bd, interpret=True)
  want, g_want = stats_and_grads(reference.token_stats, h, w, t, ref, temperature=temperature)
  fields = [f for f in got._fields if getattr(want, f) is not None]
  assert all(getattr(got, f) is not None for f in fields)
  chex.assert_trees_all_close({f: getattr(got, f) for f in fields}, {f: getattr(want, f) for f in fields},
                              rtol=rtol, atol=atol)
  chex.assert_tree_all_finite(g_got)
  for a, b in zip(g_got, g_want):  # rtol, with an absolute floor of rtol × max|grad| for cancelling sums
    assert a.dtype == b.dtype and a.shape == b.shape
    chex.assert_trees_all_close(a.astype(jnp.float32), b.astype(jnp.float32), rtol=rtol,
                                atol=rtol * float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
  return h, w, t, ref, got


def test_ragged_tokens_hidden_and_vocab_with_reference():
  # N=13 < block_n, D=24 not a multiple of block_d=16, V=300 not a multiple of block_v=128.
  h, w, t, ref, got = _check(13, 24, 300, (16, 128, 16), with_ref=True)
  oracle = numpy_stats(h, w, t, ref["ref_hidden_NxD"], ref["ref_w_DxV"], temperature=0.8)
  chex.assert_trees_all_close((got.self_certainty, got.kl), (oracle["self_certainty"], oracle["kl"]),
                              rtol=RTOL, atol=ATOL)


def test_several_token_blocks_no_reference():
  _check(40, 32, 200, (16, 64, 16), with_ref=False, seed=1, temperature=1.0)


def test_bfloat16_inputs():
  # bf16 hidden and w: fp32 accumulation; the backward products run in bf16 (dz rounded), so a looser tolerance.
  _check(16, 32, 160, (16, 64, 32), with_ref=False, seed=2, dtype=jnp.bfloat16, rtol=2e-2, atol=2e-2)


def test_block_sizes_must_be_powers_of_two():
  h, w, t, _ = make_inputs(3, 16, 8, 300, with_ref=False)
  with pytest.raises(ValueError, match="block_v=100 must be a power of 2"):
    pallas_gpu.token_stats(h, w, t, block_v=100)
  with pytest.raises(ValueError, match="block_n=8 must be a power of 2 >= 16"):
    pallas_gpu.token_stats(h, w, t, block_n=8)


def test_api_dispatches_pallas_gpu():
  h, w, t, _ = make_inputs(4, 16, 16, 130, with_ref=False)
  got = kernels.token_stats(h, w, t, implementation="pallas_gpu")
  want = reference.token_stats(h, w, t)
  chex.assert_trees_all_close(got.logp, want.logp, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("with_ref", [False, True])
def test_lowers_to_triton_for_cuda(with_ref):
  n, d, v = 37, 24, 300  # ragged in every axis

  def loss(h, w, t, rh, rw):
    s = pallas_gpu.token_stats(h, w, t, ref_hidden_NxD=rh, ref_w_DxV=rw, temperature=0.9, block_n=16, block_v=128,
                               block_d=16, interpret=False)
    return sum(jnp.sum(x) for x in [s.logp, s.entropy, s.self_certainty] + ([s.kl] if with_ref else []))

  bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  args = (bf16(n, d), bf16(d, v), jax.ShapeDtypeStruct((n,), jnp.int32),
          bf16(n, d) if with_ref else None, bf16(d, v) if with_ref else None)
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  exp = jax.export.export(grad, platforms=["cuda"],
                          disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
  assert exp.platforms == ("cuda",)
  text = exp.mlir_module()
  assert text.count(TRITON) == 2, text.count(TRITON)  # the forward and the fused backward kernel
  for name in ("token_stats_gpu_fwd", "token_stats_gpu_bwd"):
    assert name in text
  assert exp.mlir_module_serialized


def test_export_without_the_disabled_check_refuses_triton():
  # The oracle that the lowering test can fail: the check it disables is real and names the Triton target.
  f = jax.jit(lambda h, w, t: pallas_gpu.token_stats(h, w, t, interpret=False).logp)
  args = (jax.ShapeDtypeStruct((16, 16), jnp.float32), jax.ShapeDtypeStruct((16, 128), jnp.float32),
          jax.ShapeDtypeStruct((16,), jnp.int32))
  with pytest.raises(ValueError, match="xla.gpu.triton"):
    jax.export.export(f, platforms=["cuda"])(*args)
