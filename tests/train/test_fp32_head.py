"""ScaleRL FP32 LM head: with a bf16 model, fp32_head=True gives the log-probs of fp32 logits (numpy oracle)."""
import jax
import jax.numpy as jnp
import numpy as np

from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.train.objectives import rl_loss_fn, shifted_stats, sft_loss_fn
from exrl.rl.losses import LossConfig

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, model_type="qwen2", qkv_bias=True, param_dtype="float32", compute_dtype="bfloat16")


def _mb(B=4, T=10, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
  valid = np.ones((B, T), bool)
  return {"tokens": tokens, "valid": valid, "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
          "loss_mask": np.ones((B, T), np.float32), "old_logp": np.zeros((B, T), np.float32),
          "ref_logp": np.zeros((B, T), np.float32), "adv": rng.standard_normal(B).astype(np.float32),
          "trace_id": np.arange(B, dtype=np.int32), "group_id": np.zeros(B, np.int32)}


def _oracle_logp(params, mb):
  """float64 numpy log-softmax of h @ W with W at full (fp32 parameter) precision."""
  B, T = mb["tokens"].shape
  h = np.asarray(decoder.hidden_states(CFG, params, mb["tokens"], mb["valid"], mb["positions"]), np.float64)
  w = np.asarray(decoder.unembed_matrix(CFG, params), np.float64)
  logits = h[:, :-1] @ w
  m = logits.max(-1, keepdims=True)
  lse = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
  tgt = mb["tokens"][:, 1:]
  return np.take_along_axis(logits, tgt[..., None], -1)[..., 0] - lse


def test_fp32_head_matches_fp32_logits_and_bf16_head_does_not():
  params = decoder.init_params(CFG, jax.random.key(0))
  params = jax.tree.map(lambda x: x * 8 if x.ndim == 2 and x.shape[0] == CFG.vocab_size else x, params)
  mb = jax.tree.map(jnp.asarray, _mb())
  want = _oracle_logp(params, mb)
  fp32 = np.asarray(shifted_stats(CFG, params, mb, implementation="xla", fp32_head=True).logp)
  bf16 = np.asarray(shifted_stats(CFG, params, mb, implementation="xla").logp)
  np.testing.assert_allclose(fp32, want, atol=1e-4, rtol=1e-5)
  assert np.max(np.abs(bf16 - want)) > 10 * np.max(np.abs(fp32 - want))  # the switch changes the head's precision


def test_loss_fns_take_the_switch_and_gradients_flow():
  params = decoder.init_params(CFG, jax.random.key(1))
  mb = jax.tree.map(jnp.asarray, _mb(seed=1))
  for fn in (rl_loss_fn(CFG, LossConfig(kind="cispo", aggregation="prompt"), fp32_head=True),
             sft_loss_fn(CFG, fp32_head=True)):
    grads = jax.grad(lambda p: fn(p, None, mb)[0])(params)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in leaves)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)
