"""state.clip_by_global_norm against optax's, and the memory it exists to save."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from exrl.train.state import OptimConfig, clip_by_global_norm, init_state, make_optimizer


def _tree(scale):
  rng = np.random.default_rng(0)
  return {"a": jnp.asarray(scale * rng.standard_normal((7, 5)), jnp.float32),
          "b": {"c": jnp.asarray(scale * rng.standard_normal(11), jnp.float32)}}


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])  # below, around and far above max_norm 1
def test_clip_matches_optax(scale):
  g = _tree(scale)
  ours, state = clip_by_global_norm(1.0).update(g, clip_by_global_norm(1.0).init(g))
  theirs, their_state = optax.clip_by_global_norm(1.0).update(g, optax.clip_by_global_norm(1.0).init(g))
  chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-9)
  assert state == their_state  # same (empty) state: checkpoints of either restore into the other
  assert float(optax.tree.norm(ours)) <= 1.0 + 1e-6


def test_update_keeps_no_second_gradient_tree():
  # Oracle: optax's clip in the same chain, inside the train step's shape of update (a gradient made in the step,
  # a cond over the donated state) needs a clipped copy of the gradients as XLA temp on top of the gradients.
  params = {"w": jnp.zeros((512, 1024)), "v": jnp.zeros((1024, 256))}
  nbytes = sum(x.size * 4 for x in jax.tree.leaves(params))

  def temp(opt):
    def step(x, s):
      g = jax.tree.map(lambda p: p * 0 + x, s.params)

      def update(args):
        g, p, o = args
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o
      return jax.lax.cond(x > 0, update, lambda args: args[1:], (g, s.params, s.opt_state))
    state = init_state(params, opt, 0)
    return jax.jit(step, donate_argnums=1).lower(1.0, state).compile().memory_analysis().temp_size_in_bytes / nbytes

  ours, theirs = temp(make_optimizer(OptimConfig(), 10)), temp(optax.chain(optax.clip_by_global_norm(1.0),
                                                                           optax.adamw(1e-4)))
  assert ours < 1.1 and theirs > 1.9, (ours, theirs)  # the gradients alone, against gradients plus their clipped copy
