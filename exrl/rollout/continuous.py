"""Continuous batching (Orca, OSDI 2022; vLLM arXiv 2309.06180): a fixed number of decode slots that take the next
request's samples as soon as rows finish, so no slot decodes padding while a queue is waiting.

Layout: each slot owns a KV region of C = P + N cache slots, laid out as the static sampler lays out one row (prompt
left-padded into [0, P), completion token t at P + t), so a row computes exactly what `sampler.sample` computes for
it. The decode step is the decoder's own `decode_step` vmapped over slots, each with its own write index and
position. Shapes are fixed by (slots, P, N): any mix of lengths and budgets runs on one compiled decode, one prefill
and one insert. Per-slot regions cost slots x C of KV memory whatever the lengths (paged blocks would hold only
what is live) and every step attends over all C slots, as the static sampler does; they need no block table, no
gather in attention and no allocator, and at exrl's sizes (C <= a few thousand, tens of slots) the cache is a small
fraction of memory, so memory, not speed, is what paging would buy.

A request (prompt, number of samples, token budget, key) is prefilled once; its G samples are copied from that
prefix into free slots, possibly over several refills. Sample g of a request draws token t with
fold_in(fold_in(key, g), t): the same as `sampler.sample(..., keys_B=row_keys(...))`, whatever slot it lands in.

Shape suffixes: S slots, P prompt length, N max new tokens, C = P + N, D hidden, V vocab, K kv heads, E head dim.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.rollout import sampler
from exrl.rollout.sampler import SamplingConfig

TRACE_COUNT = collections.Counter()  # traces per jitted function: tests and the bench count compiles with it


class Request(NamedTuple):
  """prompt: token ids (at least one). max_new_tokens: this request's budget, one for all samples or one per sample
  (None: the engine's N). key: a PRNG key; None folds the request's index into the `run` key."""
  prompt: Sequence[int]
  num_samples: int = 1
  max_new_tokens: int | Sequence[int] | None = None
  key: jax.Array | None = None


@dataclasses.dataclass
class RunStats:
  """decode_steps: jitted decode iterations; slot_steps = steps x slots; generated: tokens emitted (useful work);
  prefill_s / decode_s / wall_s: seconds; prefills: prompts prefilled (once per request)."""
  slots: int
  decode_steps: int = 0
  generated: int = 0
  prefills: int = 0
  prefill_s: float = 0.0
  wall_s: float = 0.0

  @property
  def utilisation(self) -> float:
    return self.generated / max(self.decode_steps * self.slots, 1)


def row_keys(keys_U: Sequence[jax.Array], num_samples: Sequence[int]) -> jax.Array:
  """Per-row keys [sum(G)] for requests with keys_U and G samples each: sample g of request u gets fold_in(key_u, g)."""
  return jnp.stack([jax.random.fold_in(k, g) for k, n in zip(keys_U, num_samples) for g in range(n)])


# ----------------------------------------------------------------------------- device functions


def _decode_rows(config: ModelConfig, params: dict, tok_S, pos_S, index_S, cache: dict):
  """One token per slot, each written at its own cache index: the decoder's decode_step vmapped over slots."""
  def one(tok, pos, index, cache_row):
    c = jax.tree.map(lambda a: a[None], cache_row)
    h_1x1xD, c = decoder.decode_step(config, params, tok[None, None], pos[None, None], jnp.ones((1, 1), bool), c,
                                     index)
    return h_1x1xD[0, 0], jax.tree.map(lambda a: a[0], c)
  return jax.vmap(one)(tok_S, pos_S, index_S, cache)


def init_state(config: ModelConfig, sampling: SamplingConfig, slots: int, prompt_len: int) -> dict:
  """The engine's device state: per-slot KV regions, the hidden state that predicts each slot's next token, counters
  and per-slot output buffers [S, N]."""
  S, N = slots, sampling.max_new_tokens
  z = lambda dt: jnp.zeros((S, N), dt)
  key_data = jax.random.key_data(jax.random.split(jax.random.key(0), S))
  return {"cache": decoder.init_cache(config, S, prompt_len + N, per_layer=True),
          "h_SxD": jnp.zeros((S, config.hidden_size), config.dtype), "t_S": jnp.zeros((S,), jnp.int32),
          "len_S": jnp.zeros((S,), jnp.int32), "end_S": jnp.zeros((S,), jnp.int32),
          "active_S": jnp.zeros((S,), bool), "key_S": key_data, "steps": jnp.int32(0), "generated": jnp.int32(0),
          "tokens_SxN": z(jnp.int32), "mask_SxN": z(bool), "gen_SxN": z(bool), "logp_SxN": z(jnp.float32),
          "sc_SxN": z(jnp.float32), "entropy_SxN": z(jnp.float32)}


def _prefill(config: ModelConfig, params: dict, tokens_1xP, valid_1xP):
  """A prompt's KV prefix ([1, ...] per layer), cache validity, last hidden state [D] and length."""
  TRACE_COUNT["prefill"] += 1
  params = decoder.unstack_layers(params)
  cache = decoder.init_cache(config, 1, tokens_1xP.shape[1], per_layer=True)
  h_1xPxD, cache = decoder.decode_step(config, params, tokens_1xP, decoder.default_positions(valid_1xP), valid_1xP,
                                       cache, 0)
  return cache, h_1xPxD[0, -1], jnp.sum(valid_1xP, dtype=jnp.int32)


def _insert(state: dict, prefix: dict, h_D, length, slot_M, end_M, key_M):
  """Copy one prefix into the slots slot_M (index S: no slot, dropped) with per-row ends and keys."""
  TRACE_COUNT["insert"] += 1
  C, P = state["cache"]["valid"].shape[1], prefix["valid"].shape[1]
  put = lambda x, v: x.at[slot_M].set(v, mode="drop")
  cache = state["cache"]
  k = tuple(x.at[slot_M, :, :, :P].set(jnp.broadcast_to(p, (len(slot_M), *p.shape[1:])), mode="drop")
            for x, p in zip(cache["k"], prefix["k"]))
  v = tuple(x.at[slot_M, :, :P, :].set(jnp.broadcast_to(p, (len(slot_M), *p.shape[1:])), mode="drop")
            for x, p in zip(cache["v"], prefix["v"]))
  valid_C = jnp.concatenate([prefix["valid"][0], jnp.zeros((C - P,), bool)])
  M = len(slot_M)
  return {**state, "cache": {"k": k, "v": v, "valid": put(cache["valid"], jnp.broadcast_to(valid_C, (M, C)))},
          "h_SxD": put(state["h_SxD"], jnp.broadcast_to(h_D, (M, h_D.shape[0]))),
          "t_S": put(state["t_S"], jnp.zeros((M,), jnp.int32)),
          "len_S": put(state["len_S"], jnp.broadcast_to(length, (M,))), "end_S": put(state["end_S"], end_M),
          "active_S": put(state["active_S"], jnp.ones((M,), bool)), "key_S": put(state["key_S"], key_M)}


def _decode(config: ModelConfig, sampling: SamplingConfig, params: dict, state: dict, min_free, max_steps):
  """Decode all live slots until min_free slots are free (or none is live, or max_steps steps)."""
  TRACE_COUNT["decode"] += 1
  S, N = state["t_S"].shape[0], sampling.max_new_tokens
  P = state["cache"]["valid"].shape[1] - N
  params = decoder.unstack_layers(params)
  head_dtype = sampling.head_dtype or config.dtype
  w_DxV = decoder.unembed_matrix(config, params).astype(head_dtype)
  pad = sampling.pad_id if sampling.pad_id is not None else (config.pad_token_id or 0)
  stop_ids = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)
  rows = jnp.arange(S)

  def body(carry):
    st, n = carry
    t_S, live_S = st["t_S"], st["active_S"]
    logits_SxV = jnp.einsum("sd,dv->sv", st["h_SxD"].astype(head_dtype), w_DxV, preferred_element_type=jnp.float32)
    keys_S = sampler.step_key(jax.random.wrap_key_data(st["key_S"]), t_S)
    tok_S, *stats = sampler.choose_tokens_with_stats(logits_SxV, keys_S, sampling)
    forced_S = jnp.zeros((S,), bool)
    if sampling.think_budget:
      tok_S, forced_S = sampler.interrupt(t_S, tok_S, sampling)
    loss_S = live_S & ~forced_S
    col_S = jnp.where(live_S, t_S, N)  # finished slots write nowhere
    put = lambda x_SxN, x_S: x_SxN.at[rows, col_S].set(x_S.astype(x_SxN.dtype), mode="drop")
    out = {"tokens_SxN": put(st["tokens_SxN"], tok_S), "mask_SxN": put(st["mask_SxN"], loss_S),
           "gen_SxN": put(st["gen_SxN"], live_S)}
    for name, x_S in zip(("logp_SxN", "sc_SxN", "entropy_SxN"), stats):
      out[name] = put(st[name], jnp.where(loss_S, x_S, 0.0))
    stop_S = jnp.any(tok_S[:, None] == stop_ids[None, :], axis=-1) & ~forced_S
    active_S = live_S & ~stop_S & (t_S + 1 < st["end_S"])
    # Token t goes in at cache slot P + t and position len + t; its hidden state predicts token t + 1.
    h_SxD, cache = _decode_rows(config, params, jnp.where(live_S, tok_S, pad), st["len_S"] + t_S,
                                jnp.minimum(P + t_S, P + N - 1), st["cache"])
    st = {**st, **out, "cache": cache, "h_SxD": h_SxD.astype(st["h_SxD"].dtype), "active_S": active_S,
          "t_S": t_S + live_S, "steps": st["steps"] + 1, "generated": st["generated"] + jnp.sum(live_S)}
    return st, n + 1

  def cond(carry):
    st, n = carry
    live = jnp.sum(st["active_S"])
    return (live > 0) & (S - live < min_free) & (n < max_steps)

  state, _ = jax.lax.while_loop(cond, body, (state, jnp.int32(0)))
  return state


_prefill_jit = jax.jit(_prefill, static_argnames=("config",))
_insert_jit = jax.jit(_insert, donate_argnames=("state",))
_decode_jit = jax.jit(_decode, static_argnames=("config", "sampling"), donate_argnames=("state",))


# ----------------------------------------------------------------------------- host scheduler


class RowOutput(NamedTuple):
  """One finished row (numpy, length N): what `SampleOutput` holds per row, plus gen (generated incl. injected)."""
  tokens: np.ndarray
  mask: np.ndarray
  gen: np.ndarray
  logp: np.ndarray
  self_certainty: np.ndarray
  entropy: np.ndarray


def run(config: ModelConfig, params: dict, requests: Sequence[Request], sampling: SamplingConfig, *, slots: int,
        prompt_len: int, key: jax.Array | None = None, refill_min_free: int = 1, max_steps: int = 1 << 30
        ) -> tuple[list[list[RowOutput]], RunStats]:
  """Generate every request's samples on `slots` decode slots; returns (per request, its rows in sample order; stats).

  prompt_len: the fixed padded prompt width P (prompts are left-padded to it; longer ones are refused).
  sampling.max_new_tokens is the slot width N and the cap on every request's budget. refill_min_free: decode until
  this many slots are free before refilling while requests wait (1: refill as soon as a row ends; more: fewer host
  round trips). Results depend only on each request's key, never on slots or neighbours.
  """
  sampler.check_interrupt(sampling)
  S, P, N = slots, prompt_len, sampling.max_new_tokens
  if S < 1 or P < 1 or not 1 <= refill_min_free <= S:
    raise ValueError(f"slots={S}, prompt_len={P} must be >= 1 and refill_min_free={refill_min_free} in [1, slots]")
  if P + N > config.max_position_embeddings:
    raise ValueError(f"prompt_len {P} + max_new_tokens {N} exceeds max_position_embeddings="
                     f"{config.max_position_embeddings}")
  pad = sampling.pad_id if sampling.pad_id is not None else (config.pad_token_id or 0)
  end_cap = (sampling.think_budget + len(sampling.interrupt_token_ids) + sampling.answer_budget
             if sampling.think_budget else N)
  budgets = []
  for i, r in enumerate(requests):
    b = np.broadcast_to(np.asarray(N if r.max_new_tokens is None else r.max_new_tokens, np.int64), (r.num_samples,)
                        ) if r.num_samples >= 1 else np.zeros((0,), np.int64)
    if not 0 < len(r.prompt) <= P or r.num_samples < 1 or b.size == 0 or b.min() < 1 or b.max() > N:
      raise ValueError(f"request {i}: prompt of {len(r.prompt)} tokens must be in [1, prompt_len={P}], num_samples="
                       f"{r.num_samples} >= 1, max_new_tokens={r.max_new_tokens} in [1, {N}] (one or one per sample)")
    budgets.append(np.minimum(b, end_cap).astype(np.int32))
  base_key = jax.random.key(0) if key is None else key
  t0 = time.perf_counter()
  stats = RunStats(slots=S)
  state = init_state(config, sampling, S, P)
  results: list[list[RowOutput | None]] = [[None] * r.num_samples for r in requests]
  queue = collections.deque(range(len(requests)))
  owner: dict[int, tuple[int, int]] = {}  # slot -> (request, sample)
  prefix, next_sample = None, 0  # the queue head's prefill and its next sample to place
  free = list(range(S))
  while queue or owner:
    while free and queue:
      u = queue[0]
      r = requests[u]
      if prefix is None:
        tokens_1xP = np.full((1, P), pad, np.int32)
        tokens_1xP[0, P - len(r.prompt):] = r.prompt
        tp = time.perf_counter()
        valid_1xP = np.arange(P)[None] >= P - len(r.prompt)
        prefix = jax.block_until_ready(_prefill_jit(config, params, tokens_1xP, valid_1xP))
        stats.prefill_s += time.perf_counter() - tp
        stats.prefills += 1
      take = min(len(free), r.num_samples - next_sample)
      slot_M = np.full((S,), S, np.int32)
      slot_M[:take], free = free[:take], free[take:]
      req_key = base_key if r.key is None else r.key
      req_key = jax.random.fold_in(req_key, u) if r.key is None else req_key
      keys = jax.random.key_data(row_keys([req_key], [r.num_samples]))
      key_M = jnp.zeros((S, *keys.shape[1:]), keys.dtype).at[:take].set(keys[next_sample:next_sample + take])
      end_M = np.zeros((S,), np.int32)
      end_M[:take] = budgets[u][next_sample:next_sample + take]
      cache, h_D, length = prefix
      state = _insert_jit(state, cache, h_D, length, slot_M, end_M, key_M)
      for j, s in enumerate(slot_M[:take]):
        owner[int(s)] = (u, next_sample + j)
      next_sample += take
      if next_sample == r.num_samples:
        queue.popleft()
        prefix, next_sample = None, 0
    state = _decode_jit(config, sampling, params, state, refill_min_free if queue else S + 1, max_steps)
    active_S, t_S = jax.device_get((state["active_S"], state["t_S"]))
    done = [s for s in owner if not active_S[s]]
    if done:
      host = jax.device_get({k: state[k] for k in ("tokens_SxN", "mask_SxN", "gen_SxN", "logp_SxN", "sc_SxN",
                                                   "entropy_SxN")})
      for s in done:
        keep_N = np.arange(N) < t_S[s]  # the buffers past a row's length hold an earlier occupant's values
        u, g = owner.pop(s)
        results[u][g] = RowOutput(np.where(keep_N, host["tokens_SxN"][s], pad), host["mask_SxN"][s] & keep_N,
                                  host["gen_SxN"][s] & keep_N,
                                  *(np.where(keep_N, host[k][s], 0.0) for k in ("logp_SxN", "sc_SxN", "entropy_SxN")))
        free.append(s)
  steps, generated = jax.device_get((state["steps"], state["generated"]))
  stats.decode_steps, stats.generated = int(steps), int(generated)
  stats.wall_s = time.perf_counter() - t0
  return results, stats
