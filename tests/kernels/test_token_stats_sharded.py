"""Vocabulary sharded over mesh axis "tensor" (8 forced CPU devices) against the unsharded result."""
import chex
import jax
import jax.numpy as jnp
import pytest

from exrl.kernels import xla
from exrl.kernels.sharded import token_stats_vocab_sharded
from token_stats_oracle import make_inputs, weighted_loss

FIELDS = ("logp", "lse", "entropy", "self_certainty", "kl", "ref_logp", "ref_lse")


def _mesh(data, tensor):
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((data, tensor), ("data", "tensor"), axis_types=auto)


@pytest.mark.parametrize("data,tensor,token_axes", [(2, 4, "data"), (1, 8, None)])
def test_sharded_matches_unsharded(data, tensor, token_axes):
  assert jax.device_count() == 8
  mesh = _mesh(data, tensor)
  n, d, v = 6, 16, 8 * 40  # 40 columns per shard at 8-way; block 16 leaves a ragged block in each shard
  h, w, t, ref = make_inputs(11, n, d, v)

  def sharded(h, w):
    return token_stats_vocab_sharded(h, w, t, mesh=mesh, **ref, temperature=0.9, implementation="xla",
                                     token_axes=token_axes)

  def unsharded(h, w):
    return xla.token_stats(h, w, t, **ref, temperature=0.9, block_v=16)

  got, want = jax.jit(sharded)(h, w), jax.jit(unsharded)(h, w)
  chex.assert_trees_all_close({f: getattr(got, f) for f in FIELDS}, {f: getattr(want, f) for f in FIELDS},
                              rtol=1e-5, atol=1e-6)
  g_got = jax.jit(jax.grad(lambda h, w: weighted_loss(sharded(h, w)), argnums=(0, 1)))(h, w)
  g_want = jax.jit(jax.grad(lambda h, w: weighted_loss(unsharded(h, w)), argnums=(0, 1)))(h, w)
  for a, b in zip(g_got, g_want):
    tol = 1e-5 * float(jnp.max(jnp.abs(b)))  # rtol 1e-5 with an absolute floor scaled to the gradient
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=tol)


def test_vocab_must_divide_the_axis():
  h, w, t, _ = make_inputs(12, 4, 8, 100, with_ref=False)
  with pytest.raises(ValueError, match="V=100 must be divisible by the size of mesh axis 'tensor' \\(8\\)"):
    token_stats_vocab_sharded(h, w, t, mesh=_mesh(1, 8))
