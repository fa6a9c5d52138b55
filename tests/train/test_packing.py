"""Padding-free training: the packed forward's loss and gradients equal the padded rows' (the oracle), sharded too."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.rl.losses import LossConfig
from exrl.infra import mesh as mesh_lib
from exrl.train import packing
from exrl.train.experience import pack_microbatches, score
from exrl.train.objectives import rl_loss_fn
from exrl.train.state import OptimConfig, init_state, make_optimizer
from exrl.train.step import make_train_step, shard_batch
from exrl.train.trainer import setup_state

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, model_type="qwen2", qkv_bias=True)
G = 4


def _rows(B=16, P=6, N=10, seed=0):
  """GroupCollector-like rows: left-padded prompts of 2..P tokens, completions of 1..N (then right padding)."""
  rng = np.random.default_rng(seed)
  T = P + N
  tokens = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
  valid = np.zeros((B, T), bool)
  loss_mask = np.zeros((B, T), np.float32)
  for i, (p, n) in enumerate(zip(rng.integers(2, P + 1, B), rng.integers(1, N + 1, B))):
    valid[i, P - p:P + n] = True
    loss_mask[i, P:P + n] = 1
  positions = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
  noise = lambda: (-3 + 0.3 * rng.standard_normal((B, T))).astype(np.float32) * loss_mask
  return {"tokens": tokens, "valid": valid, "positions": positions, "loss_mask": loss_mask, "old_logp": noise(),
          "ref_logp": noise(), "adv": rng.standard_normal(B).astype(np.float32),
          "trace_id": np.arange(B, dtype=np.int32), "group_id": (np.arange(B) // G).astype(np.int32)}


def test_bin_rows_takes_four_steps_an_octave():
  assert [packing.bin_rows(n) for n in range(1, 19)] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 10, 12, 12, 14, 14, 16, 16, 20, 20]
  assert packing.bin_rows(9, row_multiple=4) == 12 and packing.bin_rows(37, row_multiple=4) == 40
  assert all(packing.bin_rows(n) < 1.25 * n for n in range(1, 1000))


def test_first_fit_decreasing_places_every_span_without_overlap():
  rng = np.random.default_rng(0)
  length_R = rng.integers(0, 20, 50)
  bin_R, offset_R, n = packing.first_fit_decreasing(length_R, 24)
  assert (bin_R[length_R == 0] == -1).all() and (bin_R[length_R > 0] >= 0).all()
  used = np.zeros((n, 24), int)
  for b, o, k in zip(bin_R, offset_R, length_R):
    if k:
      used[b, o:o + k] += 1
  assert used.max() == 1 and used.sum() == length_R.sum()
  assert n <= -(-length_R.sum() // 24) + 2  # near the bound: spans are short against the bin
  with pytest.raises(ValueError, match="does not fit a bin of width 5"):
    packing.first_fit_decreasing(np.array([3, 6]), 5)


def test_unpack_index_points_at_each_token_in_its_own_segment():
  rows = _rows()
  batch = pack_microbatches(rows, 2)
  packed = packing.pack(batch, width=24)
  M, Bm, T = batch["tokens"].shape
  W = packed["packed_tokens"].shape[-1]
  assert W == 24 and packed["packed_tokens"].size < batch["tokens"].size
  for m in range(M):
    for r in range(Bm):
      start = np.argmax(batch["valid"][m, r])
      for t in range(start + 1, T):
        if not batch["valid"][m, r, t]:
          continue
        b, s = divmod(int(packed["unpack_index"][m, r, t - 1]), W - 1)  # the stat at shifted slot s predicts s+1
        assert packed["packed_tokens"][m, b, s + 1] == batch["tokens"][m, r, t]
        assert packed["packed_positions"][m, b, s + 1] == batch["positions"][m, r, t]
        assert packed["packed_segment"][m, b, s] == packed["packed_segment"][m, b, s + 1] == r
  assert packed["packed_valid"].sum() == batch["valid"].sum()
  for k in ("tokens", "valid", "loss_mask", "old_logp"):  # the rows, zero-padded to the bins' width
    assert packed[k].shape == (M, Bm, W) and not packed[k][..., T:].any()
    np.testing.assert_array_equal(packed[k][..., :T], batch[k])
  np.testing.assert_array_equal(packed["adv"], batch["adv"])


def test_pack_rejects_loss_on_a_rows_first_token_and_skips_when_nothing_is_saved():
  rows = _rows()
  first = int(np.argmax(rows["valid"][3]))
  rows["loss_mask"][3, first] = 1
  with pytest.raises(ValueError, match=f"row 3: loss_mask is 1.0 at token {first}"):
    packing.pack(pack_microbatches(rows, 1), width=32)
  full = {k: np.ones((1, 8, 16), bool if k == "valid" else np.int32) for k in ("tokens", "valid", "positions")}
  full["loss_mask"] = np.zeros((1, 8, 16), np.float32)
  assert packing.pack(full, width=16) is None  # 8 full rows of 16 fill 8 bins of 16: nothing saved
  with pytest.raises(ValueError, match="pack width=0; must be a positive int"):
    packing.pack(full, width=0)


@pytest.mark.parametrize("loss_cfg", [
    LossConfig(kl_beta=0.1, aggregation="token_mean"),
    LossConfig(kl_beta=0.05, kl_estimator="exact", aggregation="seq_mean_token_mean", entropy_coef=0.01),
    LossConfig(kind="cispo", aggregation="prompt"),
    LossConfig(aggregation="constant", clip_eps_high=0.28)])
def test_packed_loss_and_gradients_equal_the_padded_rows(loss_cfg):
  params = decoder.init_params(CFG, jax.random.key(0))
  ref = decoder.init_params(CFG, jax.random.key(1))
  batch = pack_microbatches(_rows(), 1)
  packed = packing.pack(batch, width=24)
  assert packed is not None
  mb = jax.tree.map(lambda x: jnp.asarray(x[0]), batch)
  mb_packed = jax.tree.map(lambda x: jnp.asarray(x[0]), packed)
  fn = rl_loss_fn(CFG, loss_cfg)
  grad = jax.jit(jax.value_and_grad(lambda p, b: fn(p, ref, b)[0]))
  (want_loss, want_g), (got_loss, got_g) = grad(params, mb), grad(params, mb_packed)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got_g, want_g, atol=1e-5, rtol=1e-4)
  _, _, want_m = fn(params, ref, mb)
  _, _, got_m = fn(params, ref, mb_packed)
  chex.assert_trees_all_close(got_m, want_m, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_packed_sharded_step_matches_the_unsharded_padded_step(mesh_shape):
  loss_cfg = LossConfig(kl_beta=0.1, aggregation="seq_mean_token_mean")
  opt = make_optimizer(OptimConfig(lr=1e-2, warmup_frac=0.0, eps=1e-4), 10)
  ref = decoder.init_params(CFG, jax.random.key(1))
  rows = _rows(B=64)
  state = init_state(decoder.init_params(CFG, jax.random.key(0)), opt, seed=0)
  want_state, want = make_train_step(rl_loss_fn(CFG, loss_cfg), opt)(
      state, jax.tree.map(jnp.asarray, pack_microbatches(rows, 2)), ref)

  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(*mesh_shape), jax.devices()[:8])
  div = mesh_lib.batch_divisor(mesh)
  state, sh = setup_state(CFG, decoder.init_params(CFG, jax.random.key(0)), opt, 0, mesh)
  batch = pack_microbatches(rows, 2, div)
  packed = packing.pack(batch, width=24, row_multiple=div)
  assert packed is not None and packed["packed_tokens"].shape[1] % div == 0
  step = make_train_step(rl_loss_fn(CFG, loss_cfg, mesh=mesh), opt, mesh, sh, sh.params)
  got_state, got = step(state, shard_batch(packed, mesh), jax.device_put(ref, sh.params))
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jax.device_get(got_state.params), jax.device_get(want_state.params),
                              atol=1e-5, rtol=1e-5)


def test_packed_scoring_equals_the_rows():
  rows = _rows(B=32)
  args = [jnp.asarray(rows[k]) for k in ("tokens", "valid", "positions")] + [jnp.asarray(rows["loss_mask"] > 0)]
  policy, ref = decoder.init_params(CFG, jax.random.key(0)), decoder.init_params(CFG, jax.random.key(1))
  want = score(CFG, policy, ref, *args, with_ref=True, temperature=0.7)
  got = score(CFG, policy, ref, *args, with_ref=True, temperature=0.7, pack_width=24)
  assert packing.pack({k: rows[k][None] for k in ("tokens", "valid", "positions", "loss_mask")}, width=24)
  resp = np.asarray(args[3], np.float32)
  for k in ("logp", "ref_logp", "sc_B", "ref_sc_B"):
    np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=1e-5, err_msg=k)
  for k in ("self_certainty", "entropy"):  # the rows' own stats wherever a token has a predecessor in its span
    np.testing.assert_allclose(np.asarray(got[k]) * resp, np.asarray(want[k]) * resp, atol=1e-5, rtol=1e-5)
