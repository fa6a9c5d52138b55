"""Loss functions for the train step: RL (GRPO family) and SFT, both through `kernels.token_stats`.

Per-token batch fields are aligned with `tokens` (index t describes token t), so the stats that
predict token t come from the hidden state at t-1: everything is shifted by one here.

Micro-batch fields ([Bm, T] unless noted): tokens, valid, positions, loss_mask (float, 1 where a
token carries loss), and for RL old_logp, ref_logp (k3 KL), adv [Bm], trace_id [Bm], group_id [Bm].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from exrl import kernels
from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.rl.losses import LossConfig, policy_loss
from exrl.infra import mesh as mesh_lib
from exrl.kernels.sharded import token_stats_vocab_sharded


def vocab_parallel(mesh, vocab_size: int) -> bool:
  """Whether the LM-head statistics run vocab-parallel on `mesh`: tensor > 1 and V splits evenly over it
  (the same condition under which the param rules shard the vocabulary over tensor)."""
  return mesh is not None and dict(mesh.shape).get("tensor", 1) > 1 and vocab_size % mesh.shape["tensor"] == 0


def shifted_stats(config: ModelConfig, params, mb: dict, *, ref_params=None, remat: bool = False,
                  implementation: str = "auto", temperature: float = 1.0, fp32_head: bool = False, mesh=None):
  """Token stats for tokens[:, 1:] from one forward pass; fields are float32[Bm, T-1].

  With the `train.packing` fields in `mb` the forward runs on the packed bins, and the stats are gathered back
  to the rows (tokens without a statistic, where the loss mask is 0, read slot 0).

  temperature: the stats are of softmax(logits / temperature), computed as h @ (W / temperature) so the
  fused kernel never sees the logits; the reference (exact KL) is scaled the same way.
  mesh: the train step's mesh (or None). With tensor > 1 the statistics go through `kernels.sharded`
  (shard_map): each device streams only its V/tensor columns of W, and over the tensor axis only [N]-sized
  partial statistics (and, backward, the hidden gradient) cross devices, instead of leaving XLA to partition
  the chunked scan over a vocab-sharded W.
  """
  packed = "packed_tokens" in mb  # padding-free: the model runs on bins, the stats go back to rows (train.packing)
  names = ("packed_tokens", "packed_valid", "packed_positions", "packed_segment") if packed else (
      "tokens", "valid", "positions")
  inputs = [mb[k] for k in names]
  B, T = inputs[0].shape
  hidden = decoder.hidden_states(config, params, *inputs, remat=remat)
  h_NxD = hidden[:, :-1].reshape(B * (T - 1), -1)
  # fp32_head (ScaleRL): the LM head in fp32 even when the model runs in bf16
  head_dtype = jnp.float32 if fp32_head else config.dtype
  h_NxD = h_NxD.astype(head_dtype) if fp32_head else h_NxD
  targets_N = inputs[0][:, 1:].reshape(-1)
  scale = lambda w: w if temperature == 1.0 else w / temperature
  sharded = vocab_parallel(mesh, config.vocab_size)
  # A tied head is read as the [V, D] embedding it is (no transposed fp32 copy, its gradient lands as [V, D]);
  # the vocab-parallel path shards [D, V] columns and keeps the transpose.
  layout = "VxD" if config.tie_word_embeddings and not sharded else "DxV"
  head = lambda p: scale((p["embed"] if layout == "VxD" else decoder.unembed_matrix(config, p)).astype(head_dtype))
  w_head = head(params)  # [V, D] or [D, V], per layout
  ref = {}
  if ref_params is not None:
    ref_hidden = decoder.hidden_states(config, ref_params, *inputs)
    ref["ref_hidden_NxD"] = jax.lax.stop_gradient(ref_hidden[:, :-1].reshape(B * (T - 1), -1).astype(h_NxD.dtype))
    ref["ref_w_DxV"] = jax.lax.stop_gradient(head(ref_params))
  if sharded:
    # Tokens stay split over (data, fsdp) as the step's rows are; replicated if they do not divide evenly.
    token_axes = mesh_lib.BATCH_AXES if h_NxD.shape[0] % mesh_lib.batch_divisor(mesh) == 0 else None
    stats = token_stats_vocab_sharded(h_NxD, w_head, targets_N, mesh=mesh, implementation=implementation,
                                      token_axes=token_axes, **ref)
  else:
    stats = kernels.token_stats(h_NxD, w_head, targets_N, implementation=implementation, layout=layout, **ref)
  if packed:  # unpack_index [Bm, T-1] points each row token's statistic at its slot in the bins
    return jax.tree.map(lambda x: x[mb["unpack_index"]], stats)
  return jax.tree.map(lambda x: x.reshape(B, T - 1), stats)


def _count_weight(mask_BxT, ids_B, aggregation: str):
  """How many units the aggregation averages over in this micro-batch (tokens, traces or groups)."""
  if aggregation == "token_mean":
    return jnp.sum(mask_BxT)
  has_tokens_B = (jnp.sum(mask_BxT, axis=1) > 0).astype(jnp.float32)
  if aggregation == "constant":  # Dr.GRPO divides by the number of traces, empty or not
    has_tokens_B = jnp.ones_like(has_tokens_B)
  present = jax.ops.segment_max(has_tokens_B, ids_B, num_segments=ids_B.shape[0])
  return jnp.sum(present > 0).astype(jnp.float32)


def rl_loss_fn(config: ModelConfig, loss_cfg: LossConfig, *, remat: bool = False, implementation: str = "auto",
               temperature: float = 1.0, on_policy: bool = False, fp32_head: bool = False, mesh=None):
  """(params, ref_params, mb) -> (loss, weight, metrics) for the GRPO-family policy loss.

  temperature: log-probs (and the PPO ratio, the KL and the entropy) are of softmax(logits / T), the
    distribution the rollout was sampled from, as in TRL and verl.
  on_policy: the batch was sampled by exactly these params and is trained on once (one inner epoch), so
    the old log-probs are this forward's own, detached: ρ ≡ 1, and no separate re-scoring pass is needed.
    The loss and gradient equal those with old log-probs from a re-scoring forward at the same params.
    With loss_cfg.tis_cap > 0 (needs on_policy) the batch's old_logp are read as the behaviour log-probs of TIS.
  fp32_head: the LM head (hidden and unembedding) in fp32 when the model computes in bf16 (ScaleRL).
  mesh: the step's mesh; with tensor > 1 the token statistics are vocab-parallel (see `shifted_stats`).
  """
  exact_kl = loss_cfg.kl_beta > 0 and loss_cfg.kl_estimator == "exact"
  if loss_cfg.tis_cap > 0 and not on_policy:
    raise ValueError(f"LossConfig.tis_cap={loss_cfg.tis_cap} needs on_policy=True (one inner epoch): the old "
                     f"log-probs are then this forward's and the batch's old_logp the behaviour policy's")

  def fn(params, ref_params, mb):
    stats = shifted_stats(config, params, mb, ref_params=ref_params if exact_kl else None, remat=remat,
                          implementation=implementation, fp32_head=fp32_head, temperature=temperature, mesh=mesh)
    mask = mb["loss_mask"][:, 1:].astype(jnp.float32)
    # Packed rows are padded past their width T; "constant" aggregation's default normaliser is the shifted
    # width the loss would see unpadded, T - 1.
    kw = dict(trace_id_B=mb["trace_id"], group_id_B=mb["group_id"],
              row_width=mb["row_width"][0].astype(jnp.float32) - 1 if "row_width" in mb else None)
    if loss_cfg.kl_beta > 0:
      kw.update(exact_kl_BxT=stats.kl) if exact_kl else kw.update(ref_logp_BxT=mb["ref_logp"][:, 1:])
    if loss_cfg.entropy_coef > 0:
      kw["entropy_BxT"] = stats.entropy
    old_logp = jax.lax.stop_gradient(stats.logp) if on_policy else mb["old_logp"][:, 1:]
    if loss_cfg.tis_cap > 0:  # the batch's old_logp are the generator's: the behaviour policy of truncated IS
      kw["behav_logp_BxT"] = mb["old_logp"][:, 1:]
    loss, metrics = policy_loss(stats.logp, old_logp, mb["adv"], mask, loss_cfg, **kw)
    ids = mb["group_id"] if loss_cfg.aggregation == "prompt" else mb["trace_id"]
    weight = _count_weight(mask, ids, loss_cfg.aggregation)
    sg = jax.lax.stop_gradient
    metrics = dict(metrics, entropy=_masked_mean(sg(stats.entropy), mask),
                   self_certainty=_masked_mean(sg(stats.self_certainty), mask))
    return loss, weight, metrics

  return fn


def sft_loss_fn(config: ModelConfig, *, remat: bool = False, implementation: str = "auto", fp32_head: bool = False,
                mesh=None):
  """Token-mean negative log-likelihood over loss_mask tokens (completion tokens only); fp32_head and mesh
  as in `rl_loss_fn`."""

  def fn(params, _frozen, mb):
    stats = shifted_stats(config, params, mb, remat=remat, implementation=implementation, fp32_head=fp32_head,
                          mesh=mesh)
    mask = mb["loss_mask"][:, 1:].astype(jnp.float32)
    n = jnp.sum(mask)
    nll = -jnp.sum(stats.logp * mask) / jnp.maximum(n, 1.0)
    entropy = _masked_mean(jax.lax.stop_gradient(stats.entropy), mask)
    return nll, n, {"nll": nll, "entropy": entropy}

  return fn


def _masked_mean(x, mask):
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)
