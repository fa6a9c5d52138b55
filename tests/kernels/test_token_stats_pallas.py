"""kernels.pallas (TPU kernel) run in interpret mode on CPU, against the reference. Tiny shapes: interpret is slow."""
import chex
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from exrl.kernels import pallas, reference
from token_stats_oracle import make_inputs, numpy_stats, stats_and_grads

RTOL, ATOL = 1e-5, 1e-6


def _check(n, d, v, bn, bv, with_ref, interpret, seed=0, temperature=0.8):
  h, w, t, ref = make_inputs(seed, n, d, v, with_ref=with_ref)
  kw = dict(temperature=temperature)
  pk = dict(block_n=bn, block_v=bv, interpret=interpret)

  got, g_got = stats_and_grads(pallas.token_stats, h, w, t, ref, **kw, **pk)
  want, g_want = stats_and_grads(reference.token_stats, h, w, t, ref, **kw)
  fields = [f for f in got._fields if getattr(want, f) is not None]
  assert all(getattr(got, f) is not None for f in fields)
  chex.assert_trees_all_close({f: getattr(got, f) for f in fields}, {f: getattr(want, f) for f in fields},
                              rtol=RTOL, atol=ATOL)
  if with_ref:  # self-certainty and KL also against the float64 numpy definitions
    oracle = numpy_stats(h, w, t, ref["ref_hidden_NxD"], ref["ref_w_DxV"], temperature=temperature)
    chex.assert_trees_all_close((got.self_certainty, got.kl), (oracle["self_certainty"], oracle["kl"]),
                                rtol=RTOL, atol=ATOL)
  chex.assert_tree_all_finite(g_got)
  for a, b in zip(g_got, g_want):  # rtol, with an absolute floor of rtol × max|grad| for cancelling sums
    chex.assert_trees_all_close(a, b, rtol=RTOL, atol=RTOL * float(jnp.max(jnp.abs(b))))


def test_ragged_tokens_and_vocab_with_reference():
  # N=13 is not a multiple of block_n=8, V=300 not a multiple of block_v=128: edge tiles hold NaN padding.
  _check(13, 16, 300, 8, 128, with_ref=True, interpret=True)


def test_divisible_no_reference():
  _check(16, 8, 256, 8, 128, with_ref=False, interpret=True, seed=1, temperature=1.0)


def test_tpu_interpret_mode():
  # Follows TPU semantics more closely (uninitialised memory is NaN, out-of-bounds reads are checked).
  _check(10, 8, 200, 8, 128, with_ref=True, interpret=pltpu.InterpretParams(), seed=2)


def test_block_shapes_must_respect_tpu_tiling():
  h, w, t, _ = make_inputs(3, 16, 8, 300, with_ref=False)
  with pytest.raises(ValueError, match="block_v=100 must be a multiple of 128"):
    pallas.token_stats(h, w, t, block_v=100)
  with pytest.raises(ValueError, match="block_n=12 must be a multiple of 8"):
    pallas.token_stats(h, w, t, block_n=12, block_v=128)


def test_api_transposes_a_vxd_head_for_pallas():
  # The Pallas kernel takes [D, V]; kernels.token_stats transposes a [V, D] head for it (values and dW as [V, D]).
  from exrl import kernels
  h, w, t, ref = make_inputs(3, 8, 8, 256, with_ref=True)
  ref_vxd = {**ref, "ref_w_DxV": ref["ref_w_DxV"].T}
  got, g_got = stats_and_grads(kernels.token_stats, h, w.T, t, ref_vxd, implementation="pallas", layout="VxD")
  want, g_want = stats_and_grads(reference.token_stats, h, w, t, ref)
  chex.assert_trees_all_close(got.logp, want.logp, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(got.kl, want.kl, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(g_got[1].T, g_want[1], rtol=RTOL, atol=RTOL * float(jnp.max(jnp.abs(g_want[1]))))
