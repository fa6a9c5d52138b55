"""From sampled rollouts to a train batch: re-scoring, rewards, advantages, packing into micro-batches.

Every per-token array here is aligned with the sequence tokens: index s describes token s, and
position 0 (never a response token) holds 0.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from exrl.models.config import ModelConfig
from exrl.rl.rewards import self_certainty_reward
from exrl.train.objectives import shifted_stats


@functools.partial(jax.jit, static_argnames=("config", "with_ref", "implementation"))
def score(config: ModelConfig, params, ref_params, tokens_BxS, valid_BxS, positions_BxS, response_BxS, *,
          with_ref: bool, implementation: str = "auto") -> dict:
  """Re-score rollouts (no gradient) at temperature 1.

  Returns token-aligned float32[B, S] `logp` (policy), `self_certainty`, `entropy`, and per-row `sc_B` =
  masked token-mean self-certainty over response tokens (Intuitor). With `with_ref`, also `ref_logp` and
  `ref_sc_B` (the frozen reference as an offline self-certainty annotator).
  """
  mb = {"tokens": tokens_BxS, "valid": valid_BxS, "positions": positions_BxS}
  stats = shifted_stats(config, params, mb, implementation=implementation)
  pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))
  resp = response_BxS.astype(jnp.float32)
  out = {"logp": pad(stats.logp) * resp, "self_certainty": pad(stats.self_certainty),
         "entropy": pad(stats.entropy)}
  out["sc_B"] = self_certainty_reward(out["self_certainty"], resp)
  if with_ref:
    ref = shifted_stats(config, ref_params, mb, implementation=implementation)
    out["ref_logp"] = pad(ref.logp) * resp
    out["ref_sc_B"] = self_certainty_reward(pad(ref.self_certainty), resp)
  return jax.lax.stop_gradient(out)


def pack_microbatches(rows: dict[str, np.ndarray], num_microbatches: int, group_size: int) -> dict[str, np.ndarray]:
  """Split [B, ...] host arrays into [M, B/M, ...] with whole groups per micro-batch.

  Adds `trace_id` (row index within the micro-batch: one trace per row) and `group_id` (group index
  within the micro-batch), as the loss wants ids local to what it sees.
  """
  B = next(iter(rows.values())).shape[0]
  if B % num_microbatches:
    raise ValueError(f"batch of {B} rows is not divisible by num_microbatches={num_microbatches}")
  Bm = B // num_microbatches
  if Bm % group_size:
    raise ValueError(f"micro-batch of {Bm} rows does not hold whole groups of group_size={group_size}; "
                     f"choose num_microbatches so that (prompts*group)/num_microbatches is a multiple of the group")
  local = np.arange(B) % Bm
  rows = dict(rows, trace_id=local.astype(np.int32), group_id=(local // group_size).astype(np.int32))
  return {k: v.reshape(num_microbatches, Bm, *v.shape[1:]) for k, v in rows.items()}
