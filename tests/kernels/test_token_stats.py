"""kernels.token_stats: the chunked-XLA implementation and the API against the reference and a numpy oracle."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exrl import kernels
from exrl.kernels import reference, xla
from token_stats_oracle import make_inputs, numpy_stats, stats_and_grads

FIELDS = ("logp", "lse", "entropy", "self_certainty", "kl", "ref_logp", "ref_lse")
RTOL, ATOL = 1e-5, 1e-6  # fp32: 1e-5 relative, with a 1e-6 floor for entries near zero


def assert_grads_close(got, want, rtol=RTOL):
  """Per leaf: rtol relative, plus an absolute floor of rtol × max|want| for entries that are sums cancelling to ~0."""
  for g, x in zip(got, want):
    chex.assert_trees_all_close(g, x, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(x))))


def _fields(stats, with_ref):
  return {f: getattr(stats, f) for f in FIELDS if with_ref or f not in ("kl", "ref_logp", "ref_lse")}


def _grads(fn, h, w, t, ref, field=None, **kw):
  return stats_and_grads(fn, h, w, t, ref, field, **kw)[1]


# (N, D, V, block_v, with_ref): V ragged w.r.t. the block, a single-column last block, V smaller than the block,
# V a multiple of the block.
CASES = [(13, 16, 300, 128, True), (7, 12, 257, 64, True), (5, 8, 100, 128, False), (8, 8, 256, 64, False)]


@pytest.mark.parametrize("n,d,v,block,with_ref", CASES)
def test_xla_values_and_grads_match_reference(n, d, v, block, with_ref):
  h, w, t, ref = make_inputs(n + v, n, d, v, with_ref=with_ref)
  kw = dict(temperature=0.7)
  got, g_got = stats_and_grads(xla.token_stats, h, w, t, ref, block_v=block, **kw)
  want, g_want = stats_and_grads(reference.token_stats, h, w, t, ref, **kw)
  chex.assert_shape(got.logp, (n,))
  chex.assert_trees_all_close(_fields(got, with_ref), _fields(want, with_ref), rtol=RTOL, atol=ATOL)
  chex.assert_tree_all_finite(g_got)
  assert_grads_close(g_got, g_want)


@pytest.mark.parametrize("field", ["logp", "lse", "entropy", "self_certainty", "kl"])
def test_xla_grad_of_each_field_matches_reference(field):
  h, w, t, ref = make_inputs(3, 9, 8, 200, with_ref=True)
  g_got = _grads(xla.token_stats, h, w, t, ref, field=field, block_v=64)
  g_want = _grads(reference.token_stats, h, w, t, ref, field=field)
  assert float(jnp.max(jnp.abs(g_want[1]))) > 1e-3  # the field really carries gradient
  assert_grads_close(g_got, g_want)


def test_reference_inputs_get_no_gradient():
  h, w, t, ref = make_inputs(4, 6, 8, 150)
  g = jax.jit(jax.grad(lambda rh, rw: jnp.sum(xla.token_stats(h, w, t, ref_hidden_NxD=rh, ref_w_DxV=rw, block_v=64).kl),
                       argnums=(0, 1)))(ref["ref_hidden_NxD"], ref["ref_w_DxV"])
  chex.assert_trees_all_close(g, jax.tree.map(jnp.zeros_like, g))


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_matches_numpy_formulas(impl):
  h, w, t, ref = make_inputs(5, 11, 16, 333, scale=1.0)
  got = jax.jit(lambda h, w: kernels.token_stats(h, w, t, **ref, temperature=1.3, implementation=impl))(h, w)
  want = numpy_stats(h, w, t, ref["ref_hidden_NxD"], ref["ref_w_DxV"], temperature=1.3)
  assert np.all(want["self_certainty"] > 0) and np.all(want["kl"] > 0)
  chex.assert_trees_all_close({k: getattr(got, k) for k in want}, {k: np.float32(x) for k, x in want.items()},
                              rtol=RTOL, atol=ATOL)


def test_bf16_inputs_accumulate_in_fp32():
  h, w, t, ref = make_inputs(6, 16, 32, 400, dtype=jnp.bfloat16)
  got, g_got = stats_and_grads(xla.token_stats, h, w, t, ref, block_v=128)
  want = jax.jit(lambda h, w: reference.token_stats(h, w, t, **ref))(h, w)
  assert got.logp.dtype == jnp.float32
  # Same bf16 products summed in fp32 on both sides: values agree to fp32 tolerance.
  chex.assert_trees_all_close(_fields(got, True), _fields(want, True), rtol=RTOL, atol=ATOL)
  up = lambda x: x.astype(jnp.float32)
  g_want = _grads(reference.token_stats, up(h), up(w), t, jax.tree.map(up, ref))
  assert g_got[0].dtype == jnp.bfloat16 and g_got[1].dtype == jnp.bfloat16
  # Gradients are computed in fp32 and rounded once to bf16 (relative step 2^-8): tolerance 1e-2 rel, 1e-2 abs.
  assert_grads_close(jax.tree.map(up, g_got), g_want, rtol=1e-2)


def test_jit_with_traced_targets():
  h, w, t, ref = make_inputs(7, 10, 8, 300, with_ref=False)
  f = jax.jit(lambda h, w, t: kernels.token_stats(h, w, t, **ref))
  chex.assert_trees_all_close(_fields(f(h, w, t), False), _fields(reference.token_stats(h, w, t), False),
                              rtol=RTOL, atol=ATOL)


def test_auto_is_xla_on_cpu():
  assert jax.default_backend() != "tpu"
  assert kernels.api.default_implementation() == "xla"


def test_bad_inputs_name_the_mismatch():
  h, w, t, ref = make_inputs(8, 4, 8, 50)
  with pytest.raises(ValueError, match="D=8.*D=7"):
    kernels.token_stats(h, w[:7], t)
  with pytest.raises(ValueError, match="found 50.*0..49"):
    kernels.token_stats(h, w, t.at[2].set(50))
  with pytest.raises(ValueError, match="found -1"):
    kernels.token_stats(h, w, t.at[0].set(-1))
  with pytest.raises(ValueError, match="ref_hidden_NxD was given without ref_w_DxV"):
    kernels.token_stats(h, w, t, ref_hidden_NxD=ref["ref_hidden_NxD"])
  with pytest.raises(ValueError, match="ref_w_DxV was given without ref_hidden_NxD"):
    kernels.token_stats(h, w, t, ref_w_DxV=ref["ref_w_DxV"])
  with pytest.raises(ValueError, match="ref_w has V=40 but w has V=50"):
    kernels.token_stats(h, w, t, ref_hidden_NxD=ref["ref_hidden_NxD"], ref_w_DxV=ref["ref_w_DxV"][:, :40])
  with pytest.raises(ValueError, match=r"targets must be \[N\]"):
    kernels.token_stats(h, w, t[:3])
  with pytest.raises(ValueError, match="implementation must be one of"):
    kernels.token_stats(h, w, t, implementation="cuda")
  with pytest.raises(ValueError, match="temperature"):
    kernels.token_stats(h, w, t, temperature=0.0)
  with pytest.raises(ValueError, match="D=8.*D=7"):  # shapes are still checked under jit
    jax.jit(lambda h, w, t: kernels.token_stats(h, w, t))(h, w[:7], t)


# ----------------------------------------------------------------------------- layout "VxD" (a tied head as stored)


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("n,d,v,block,with_ref", CASES[:2] + CASES[2:3])
def test_vxd_layout_matches_dxv_reference(impl, n, d, v, block, with_ref):
  # Oracle: the reference on the [D, V] matrix; the [V, D] layout must give the same values and dW transposed.
  h, w, t, ref = make_inputs(n + v + 1, n, d, v, with_ref=with_ref)
  ref_vxd = {k: (x.T if k == "ref_w_DxV" else x) for k, x in ref.items()}
  fn = functools.partial(xla.token_stats, block_v=block) if impl == "xla" else reference.token_stats
  got, g_got = stats_and_grads(fn, h, w.T, t, ref_vxd, temperature=0.7, layout="VxD")
  want, g_want = stats_and_grads(reference.token_stats, h, w, t, ref, temperature=0.7)
  chex.assert_trees_all_close(_fields(got, with_ref), _fields(want, with_ref), rtol=RTOL, atol=ATOL)
  chex.assert_shape(g_got[1], (v, d))
  assert_grads_close((g_got[0], g_got[1].T), g_want)


def test_vxd_layout_checks_shapes_and_name():
  h, w, t, ref = make_inputs(9, 4, 8, 50)
  with pytest.raises(ValueError, match=r"D=8 but w has D=50 \(w must be \[V, D\]\)"):
    kernels.token_stats(h, w, t, layout="VxD")  # a [D, V] matrix passed as [V, D]
  with pytest.raises(ValueError, match="ref_w has V=40 but w has V=50"):
    kernels.token_stats(h, w.T, t, ref_hidden_NxD=ref["ref_hidden_NxD"], ref_w_DxV=ref["ref_w_DxV"][:, :40].T,
                        layout="VxD")
  with pytest.raises(ValueError, match="layout must be one of"):
    kernels.token_stats(h, w, t, layout="DV")
