"""The `collect` seam: what a rollout hands the RL loop (`Experience`), re-scoring, and packing.

A collector turns a step's problems into an `Experience`:

  collector.collect(params, ref_params, problems, key) -> Experience

Single-turn GRPO / Intuitor (`exrl.train.collect.groups.GroupCollector`) is one; Delethink chunks, ExIt
self-iteration and multi-turn agents are others. The loop only packs `Experience.rows` into
micro-batches and trains on them, so a new rollout kind never touches `train_rl`.

Every per-token array here is aligned with the sequence tokens: index s describes token s, and
position 0 (never a response token) holds 0.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from exrl.infra import distributed, mesh as mesh_lib
from exrl.models.config import ModelConfig
from exrl.rl.rewards import self_certainty_reward
from exrl.train import packing
from exrl.train.objectives import shifted_stats
from exrl.train.step import shard_batch


ROW_FIELDS = ("tokens", "valid", "positions", "loss_mask", "old_logp", "ref_logp", "adv", "trace_id", "group_id")


@dataclasses.dataclass
class Experience:
  """One step's rollouts, ready to train on.

  rows: host numpy arrays, one row per packed segment, all of width T:
    tokens int32[R, T], valid bool[R, T], positions int32[R, T], loss_mask float32[R, T] (1 on tokens that
    carry loss: response tokens, or agent tokens only in a multi-turn trace), old_logp and ref_logp
    float32[R, T] (token-aligned, 0 off the mask), adv float32[R] (the trace's advantage, on every row of
    the trace), trace_id int32[R] and group_id int32[R] (global in this step; rows of one group are
    contiguous, and a trace may span several rows).
  traces: per-trace host records, each a sequence of length num_traces. Always `problem` (index into the
    step's problems), `text` (the final response), `reward` (the scalar reward the advantage came from),
    `length` (response tokens over all segments); a collector may add more (`correct`, `self_certainty`,
    `history`, ...). Sources read these in `update`.
  metrics: deterministic host floats for metrics.jsonl (means over the step): identical in a resumed run.
  timing: wall-clock host floats (per-stage seconds, tokens/s), logged apart from the metrics.
  """
  rows: dict[str, np.ndarray]
  traces: dict[str, Sequence[Any]]
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  timing: dict[str, float] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    missing = [k for k in ROW_FIELDS if k not in self.rows]
    if missing:
      raise ValueError(f"Experience.rows lacks {missing}; a collector must provide {list(ROW_FIELDS)}")
    for k in ("problem", "text", "reward", "length"):
      if k not in self.traces:
        raise ValueError(f"Experience.traces lacks {k!r}; a collector must provide problem, text, reward, length")

  @property
  def num_traces(self) -> int:
    return len(self.traces["reward"])


class Collector(Protocol):
  """Turns problems into an Experience. `close` frees host resources (worker pools, HTTP sessions)."""

  def collect(self, params, ref_params, problems: Sequence, key: jax.Array) -> Experience: ...
  def close(self) -> None: ...


def score(config: ModelConfig, params, ref_params, tokens_BxS, valid_BxS, positions_BxS, response_BxS, *,
          with_ref: bool, with_policy: bool = True, implementation: str = "auto", temperature: float = 1.0,
          pack_width: int = 0) -> dict:
  """Re-score rollouts (no gradient) at `temperature` (the sampling one, as the loss does).

  Returns token-aligned float32[B, S] `logp` (policy), `self_certainty`, `entropy`, and per-row `sc_B` =
  masked token-mean self-certainty over response tokens (Intuitor). With `with_ref`, also `ref_logp` and
  `ref_sc_B` (the frozen reference as an offline self-certainty annotator). `with_policy=False` scores
  the reference only (the policy's numbers came from the sampler).
  pack_width > 0: the forward runs on the rows packed into bins of that width (`train.packing`, reading the
  rows back to the host) when that saves token slots; the results are still the rows'.
  """
  rows = {"tokens": tokens_BxS, "valid": valid_BxS, "positions": positions_BxS, "loss_mask": response_BxS}
  packed = None
  if pack_width:
    packed = packing.pack({k: np.asarray(v)[None] for k, v in jax.device_get(rows).items()}, width=pack_width)
  if packed is None:
    return _score(config, params, ref_params, rows, with_ref=with_ref, with_policy=with_policy,
                  implementation=implementation, temperature=temperature)
  # One compile per bin count: the rows are padded to the bins' width, and the results cut back to S.
  S = tokens_BxS.shape[1]
  out = _score(config, params, ref_params, {k: v[0] for k, v in packed.items()}, with_ref=with_ref,
               with_policy=with_policy, implementation=implementation, temperature=temperature)
  return {k: v[:, :S] if v.ndim == 2 else v for k, v in out.items()}


@functools.partial(jax.jit, static_argnames=("config", "with_policy", "with_ref", "implementation", "temperature"))
def _score(config: ModelConfig, params, ref_params, mb: dict, *, with_ref: bool, with_policy: bool,
           implementation: str, temperature: float) -> dict:
  response_BxS = mb["loss_mask"]
  pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))
  resp = response_BxS.astype(jnp.float32)
  out = {}
  if with_policy:
    stats = shifted_stats(config, params, mb, implementation=implementation, temperature=temperature)
    out = {"logp": pad(stats.logp) * resp, "self_certainty": pad(stats.self_certainty),
           "entropy": pad(stats.entropy)}
    out["sc_B"] = self_certainty_reward(out["self_certainty"], resp)
  if with_ref:
    ref = shifted_stats(config, ref_params, mb, implementation=implementation, temperature=temperature)
    out["ref_logp"] = pad(ref.logp) * resp
    out["ref_sc_B"] = self_certainty_reward(pad(ref.self_certainty), resp)
  return jax.lax.stop_gradient(out)


def pack_microbatches(rows: dict[str, np.ndarray], num_microbatches: int, row_multiple: int = 1,
                      min_rows: int = 0) -> dict[str, np.ndarray]:
  """Split [R, ...] host rows into [M, Bm, ...] micro-batches, each group whole in one micro-batch.

  rows: per-token fields [R, T] and per-row fields [R] of `Experience.rows`, with global `trace_id` and
    `group_id` (a trace may span several rows: Delethink chunks). Groups are contiguous runs of rows.
  Groups are cut into M contiguous runs of about R/M rows; every micro-batch is padded to the same Bm (a
  multiple of `row_multiple`, e.g. the mesh's data*fsdp) with empty rows: valid False, loss_mask 0, adv 0.
  Ids are renumbered local to each micro-batch, as the loss wants ids in [0, Bm); padding rows get ids of
  their own, and carry no loss. Raises if M is larger than the number of groups. min_rows: Bm at least this (the
  processes of a multi-host run agree on one Bm).
  """
  group_B = np.asarray(rows["group_id"])
  R = group_B.shape[0]
  starts = np.flatnonzero(np.r_[True, group_B[1:] != group_B[:-1]])
  if len(np.unique(group_B)) != len(starts):
    raise ValueError("pack_microbatches: rows of one group must be contiguous")
  if num_microbatches < 1 or num_microbatches > len(starts):
    raise ValueError(f"num_microbatches={num_microbatches} must be in [1, {len(starts)}] (the number of groups)")
  # Cut at group starts closest to the even split points, so equal groups split exactly as R/M rows each.
  bounds = [0]
  for m in range(1, num_microbatches):
    target = m * R / num_microbatches
    cands = starts[starts > bounds[-1]]
    cands = cands[: len(cands) - (num_microbatches - 1 - m)] if num_microbatches - 1 - m else cands
    bounds.append(int(cands[np.argmin(np.abs(cands - target))]))
  bounds.append(R)
  Bm = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
  Bm = -(-max(Bm, min_rows) // row_multiple) * row_multiple
  out = {k: np.zeros((num_microbatches, Bm, *np.shape(v)[1:]), np.asarray(v).dtype) for k, v in rows.items()}
  for m, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
    for k, v in rows.items():
      out[k][m, : b - a] = np.asarray(v)[a:b]
    n = b - a
    out["trace_id"][m, :n] = _renumber(rows["trace_id"][a:b])
    out["group_id"][m, :n] = _renumber(rows["group_id"][a:b])
    out["trace_id"][m, n:] = np.arange(n, Bm)
    out["group_id"][m, n:] = np.arange(n, Bm)
  return out


def _renumber(ids: np.ndarray) -> np.ndarray:
  """Map ids to 0..k-1 in order of first appearance."""
  _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
  rank = np.argsort(np.argsort(first))
  return rank[inverse].astype(np.int32)


def device_batch(rows: dict[str, np.ndarray], num_microbatches: int, pack_width: int, mesh
                 ) -> tuple[dict[str, jax.Array], dict[str, float]]:
  """This process's rows -> the step's global batch on `mesh`, and its shape (`train_slots`, `train_width`,
  `train_fill`: token slots the update runs on, their width, and the share that are real tokens).

  One process: micro-batched, packed (pack_width > 0, when that saves slots) and placed. Several processes: each
  micro-batches and packs its own rows into the shape all agree on (rows, width, bins), ids and packed indices are
  offset to the process's block, and the global arrays are formed with `jax.make_array_from_process_local_data`.
  """
  procs, me = jax.process_count(), jax.process_index()
  row_multiple = mesh_lib.batch_divisor(mesh) // procs if mesh is not None else 1
  batch = pack_microbatches(rows, num_microbatches, row_multiple)
  if procs > 1:
    Bm, T = distributed.agree_max(batch["tokens"].shape[1]), distributed.agree_max(batch["tokens"].shape[2])
    batch = pack_microbatches(rows, num_microbatches, row_multiple, min_rows=Bm)
    batch = {k: np.pad(v, ((0, 0), (0, 0), (0, T - v.shape[2]))) if v.ndim == 3 else v for k, v in batch.items()}
  packed = None
  if pack_width and procs == 1:
    packed = packing.pack(batch, width=pack_width, row_multiple=row_multiple)
  elif pack_width:
    bins = distributed.agree_max(packing.num_bins(batch, width=pack_width, row_multiple=row_multiple))
    M, Bm, T = batch["tokens"].shape
    W = pack_width * -(-T // pack_width)
    if bins * W < Bm * T:  # the same decision on every process: packing saves slots on the agreed shapes
      packed = packing.pack(batch, width=pack_width, row_multiple=row_multiple, bins=bins)
      packed["unpack_index"] = packed["unpack_index"] + me * bins * (W - 1)
      packed["packed_segment"] = np.where(packed["packed_segment"] >= 0, packed["packed_segment"] + me * Bm, -1)
  out = packed or batch
  train_tokens = out["packed_tokens"] if packed else out["tokens"]
  shape = {"train_slots": train_tokens.size * procs, "train_width": train_tokens.shape[-1],
           "train_fill": float(distributed.agree_sum(batch["valid"].sum()) / (train_tokens.size * procs))}
  if procs == 1:
    return shard_batch(out, mesh), shape
  Bm = out["tokens"].shape[1]
  out = {**out, "trace_id": out["trace_id"] + me * Bm, "group_id": out["group_id"] + me * Bm}
  return distributed.global_batch(out, mesh), shape
