"""Continuous batching (Orca, OSDI 2022; vLLM arXiv 2309.06180): a fixed number of decode slots that take the next
request's samples as soon as rows finish, so no slot decodes padding while a queue is waiting.

Layout: each slot owns a KV region of C = P + N cache slots: the prompt left-padded into [0, P) as the static sampler
lays it out, and the completion in [P, C) as a ring: every decode step writes all slots' new tokens at one column,
P + (step mod N), so the decode step is the decoder's own batched `decode_step` (one write index for the batch,
per-row positions) with attention over each row's valid slots in any order. A row is live for at most N
consecutive steps, so its tokens never overwrite each other; a refill marks the slot's completion columns invalid.
A row computes what `sampler.sample` computes for it, up to the order of the attention sum. (Vmapping a one-row
decode_step with a write index per slot was measured first: 1.22x the batched step at 128 slots.) Per-slot regions cost slots x C of KV memory whatever the lengths (paged blocks would hold only what is
live) and every step attends over all C slots, as the static sampler does; they need no block table, no gather in
attention and no allocator, and at exrl's sizes (C <= a few thousand, tens of slots) the cache is a small fraction
of memory, so memory, not speed, is what paging would buy.

Scheduling, measured on bench_rollout (see docs/rollout.md):
- Refill: every request admitted at one refill point is prefilled in ONE call (the prompts padded to a power-of-two
  bucket of rows) that also copies the prefixes into their slots. A request whose G samples span refills is
  prefilled once: later samples copy the prefix from a slot that already holds it.
- Drain: once the queue is empty, the decode batch shrinks to the power-of-two bucket that holds the live rows (the
  rows are gathered into a smaller state), as vLLM pads to captured CUDA-graph batch sizes: the long tail of one
  long row no longer decodes `slots` rows per step.
- The host is consulted only when a row ends and a request waits, or when the live rows fit a smaller bucket; in
  between, decode runs in a jitted while_loop.
Shapes are fixed by (slots, P, N) and the buckets: any mix of lengths and budgets runs on the compiled set that
`warmup` builds (one decode per width, one refill per row bucket, one gather per width).

Sample g of a request draws token t with fold_in(fold_in(key, g), t): the same as
`sampler.sample(..., keys_B=row_keys(...))`, whatever slot or width it runs in.

Shape suffixes: W decode width (slots now in the batch), S slots, R prompts in a refill, M rows placed, P prompt
length, N max new tokens, C = P + N, D hidden, V vocab.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
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
_OUTPUTS = ("tokens_SxN", "mask_SxN", "gen_SxN", "logp_SxN", "sc_SxN", "entropy_SxN")


class Request(NamedTuple):
  """prompt: token ids (at least one). max_new_tokens: this request's budget, one for all samples or one per sample
  (None: the engine's N). key: a PRNG key (or its raw key data, see `request_keys`); None folds the request's
  index into the `run` key."""
  prompt: Sequence[int]
  num_samples: int = 1
  max_new_tokens: int | Sequence[int] | None = None
  key: jax.Array | None = None


@dataclasses.dataclass
class RunStats:
  """decode_steps: jitted decode iterations; slot_steps: sum over steps of the decode width (rows computed);
  generated: tokens emitted (useful work); prefills: prompts prefilled (once per request); refills / decode_calls /
  compactions: jitted calls. Seconds: refill_s (prefill + copy into slots), decode_s (decode calls and the flag
  read that ends each), read_s (finished rows to the host), wall_s (the whole `run`)."""
  slots: int
  decode_steps: int = 0
  slot_steps: int = 0
  generated: int = 0
  prefills: int = 0
  refills: int = 0
  decode_calls: int = 0
  compactions: int = 0
  refill_s: float = 0.0
  decode_s: float = 0.0
  read_s: float = 0.0
  wall_s: float = 0.0

  @property
  def utilisation(self) -> float:
    return self.generated / max(self.slot_steps, 1)


def row_keys(keys_U: Sequence[jax.Array], num_samples: Sequence[int]) -> jax.Array:
  """Per-row keys [sum(G)] for requests with keys_U and G samples each: sample g of request u gets fold_in(key_u, g).

  keys_U: typed PRNG keys, or their raw `key_data` (numpy) of the default implementation."""
  is_typed = lambda k: isinstance(k, jax.Array) and jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key)
  typed = [k for k in keys_U if is_typed(k)]
  impl = jax.random.key_impl(typed[0]) if typed else None
  data_U = np.stack([np.asarray(jax.random.key_data(k) if is_typed(k) else k) for k in keys_U])
  U, R = len(num_samples), int(sum(num_samples))
  Ub, Rb = (1 << max(n - 1, 0).bit_length() for n in (U, R))  # power-of-two buckets: few shapes to compile
  u_R = np.repeat(np.arange(U), num_samples)
  g_R = np.concatenate([np.arange(n) for n in num_samples]).astype(np.uint32)
  data_U = np.concatenate([data_U, np.broadcast_to(data_U[:1], (Ub - U, *data_U.shape[1:]))])
  pad_R = np.zeros(Rb - R, np.uint32)
  # one jitted, batched fold_in on host-built key data: one eager fold_in per row was 55% of a quickstart-sized
  # run's wall time, and eager stacking of typed keys 10%
  return _fold_rows(data_U, np.concatenate([u_R, pad_R]).astype(np.int32), np.concatenate([g_R, pad_R]), impl)[:R]


@functools.partial(jax.jit, static_argnums=3)
def _fold_rows(data_U, u_R, g_R, impl):
  return jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(data_U[u_R], impl=impl), g_R)


@functools.partial(jax.jit, static_argnums=1)
def _fold_each(key: jax.Array, U: int) -> jax.Array:
  return jax.random.key_data(jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(U, dtype=jnp.uint32)))


def request_keys(key: jax.Array, U: int) -> np.ndarray:
  """The raw key data of fold_in(key, u) for u < U, in one call (a `Request.key` may be such data)."""
  return np.asarray(_fold_each(key, U))


def buckets(slots: int) -> list[int]:
  """Decode widths and refill row counts: the powers of two below `slots`, and `slots`, descending."""
  return [slots] + [1 << i for i in reversed(range(max(slots - 1, 0).bit_length())) if 1 << i < slots]


def _bucket(n: int, slots: int) -> int:
  return min(b for b in buckets(slots) if b >= n)


# ----------------------------------------------------------------------------- device functions


def init_state(config: ModelConfig, sampling: SamplingConfig, slots: int, prompt_len: int) -> dict:
  """The engine's device state: per-slot KV regions, the hidden state that predicts each slot's next token, the
  prompt's last hidden state (to copy a prefix into a later slot), counters and per-slot output buffers [S, N].
  One jitted call (a score of eager zeros was 5% of a quickstart-sized run)."""
  return _init_state_jit(config, sampling.max_new_tokens, slots, prompt_len)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _init_state_jit(config: ModelConfig, N: int, S: int, prompt_len: int) -> dict:
  z = lambda dt: jnp.zeros((S, N), dt)
  key_data = jax.random.key_data(jax.random.split(jax.random.key(0), S))
  h = lambda: jnp.zeros((S, config.hidden_size), config.dtype)
  return {"cache": decoder.init_cache(config, S, prompt_len + N, per_layer=True), "h_SxD": h(), "h0_SxD": h(),
          "t_S": jnp.zeros((S,), jnp.int32), "len_S": jnp.zeros((S,), jnp.int32), "end_S": jnp.zeros((S,), jnp.int32),
          "active_S": jnp.zeros((S,), bool), "key_S": key_data, "steps": jnp.int32(0), "generated": jnp.int32(0),
          "tokens_SxN": z(jnp.int32), "mask_SxN": z(bool), "gen_SxN": z(bool), "logp_SxN": z(jnp.float32),
          "sc_SxN": z(jnp.float32), "entropy_SxN": z(jnp.float32)}


def _refill(config: ModelConfig, params: dict, state: dict, tokens_RxP, valid_RxP, slot_M, src_M, end_M, key_M):
  """Prefill R prompts in one pass and start rows: row m goes into slot slot_M[m] (S: none, dropped) with the prefix
  of source src_M[m] (< R: prompt src; else slot src - R of the current state, which already holds that prompt)."""
  TRACE_COUNT["refill"] += 1
  if not isinstance(params["layers"], (tuple, list)):
    params = decoder.unstack_layers(params)
  cache, P = state["cache"], tokens_RxP.shape[1]
  C = cache["valid"].shape[1]
  bank = {"k": tuple(x[..., :P] for x in cache["k"]), "v": tuple(x[:, :, :P] for x in cache["v"]),
          "valid": cache["valid"][:, :P], "h0": state["h0_SxD"], "len": state["len_S"]}
  if tokens_RxP.shape[0]:
    pre = decoder.init_cache(config, tokens_RxP.shape[0], P, per_layer=True)
    h_RxPxD, pre = decoder.decode_step(config, params, tokens_RxP, decoder.default_positions(valid_RxP), valid_RxP,
                                       pre, 0)
    new = {**pre, "h0": h_RxPxD[:, -1].astype(config.dtype), "len": jnp.sum(valid_RxP, 1, dtype=jnp.int32)}
    bank = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), new, bank)
  # As gathers, not scatters (XLA:CPU runs a scatter row by row: 40% of a quickstart-sized refill): slot s takes
  # bank row src_M[m] if some row m is placed in it, else its own row (R + s), which leaves it unchanged.
  S, M = state["t_S"].shape[0], slot_M.shape[0]
  placed_S = jnp.zeros((S,), bool).at[slot_M].set(True, mode="drop")
  m_S = jnp.zeros((S,), jnp.int32).at[slot_M].set(jnp.arange(M, dtype=jnp.int32), mode="drop")
  src_S = jnp.where(placed_S, src_M[m_S], tokens_RxP.shape[0] + jnp.arange(S))
  src = jax.tree.map(lambda a: a[src_S], bank)
  put = lambda x, v_M: jnp.where(placed_S.reshape((S,) + (1,) * (x.ndim - 1)), v_M[m_S], x)
  region = lambda x, p: jax.lax.dynamic_update_slice(x, p, (0,) * x.ndim)  # the prefix columns [0, P)
  valid_SxC = jnp.concatenate([src["valid"], jnp.zeros((S, C - P), bool)], 1)
  return {**state, "cache": {"k": tuple(region(x, p) for x, p in zip(cache["k"], src["k"])),
                             "v": tuple(region(x, p) for x, p in zip(cache["v"], src["v"])),
                             "valid": jnp.where(placed_S[:, None], valid_SxC, cache["valid"])},
          "h_SxD": jnp.where(placed_S[:, None], src["h0"], state["h_SxD"]), "h0_SxD": src["h0"],
          "t_S": jnp.where(placed_S, 0, state["t_S"]), "len_S": src["len"],
          "end_S": put(state["end_S"], end_M), "active_S": placed_S | state["active_S"],
          "key_S": put(state["key_S"], key_M)}


def _compact(state: dict, rows_W):
  """The state of slots rows_W only (a narrower decode batch); scalars are kept."""
  TRACE_COUNT["compact"] += 1
  return jax.tree.map(lambda a: a if a.ndim == 0 else a[rows_W], state)


def _decode(config: ModelConfig, sampling: SamplingConfig, params: dict, state: dict, min_free, max_steps):
  """Decode all live slots until min_free of the W slots are free (or none is live, or max_steps steps)."""
  TRACE_COUNT["decode"] += 1
  if not isinstance(params["layers"], (tuple, list)):  # callers that pass stacked params (versioned) unstack here
    params = decoder.unstack_layers(params)
  W, N = state["t_S"].shape[0], sampling.max_new_tokens
  P = state["cache"]["valid"].shape[1] - N
  head_dtype = sampling.head_dtype or config.dtype
  w_DxV = decoder.unembed_matrix(config, params).astype(head_dtype)
  pad = sampling.pad_id if sampling.pad_id is not None else (config.pad_token_id or 0)
  stop_ids = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)
  rows = jnp.arange(W)

  def body(carry):
    st, n = carry
    t_W, live_W = st["t_S"], st["active_S"]
    logits_WxV = jnp.einsum("sd,dv->sv", st["h_SxD"].astype(head_dtype), w_DxV, preferred_element_type=jnp.float32)
    keys_W = sampler.step_key(jax.random.wrap_key_data(st["key_S"]), t_W)
    tok_W, *stats = sampler.choose_tokens_with_stats(logits_WxV, keys_W, sampling)
    forced_W = jnp.zeros((W,), bool)
    if sampling.think_budget:
      tok_W, forced_W = sampler.interrupt(t_W, tok_W, sampling)
    loss_W = live_W & ~forced_W
    col_W = jnp.where(live_W, t_W, N)  # finished slots write nowhere
    put = lambda x_WxN, x_W: x_WxN.at[rows, col_W].set(x_W.astype(x_WxN.dtype), mode="drop")
    out = {"tokens_SxN": put(st["tokens_SxN"], tok_W), "mask_SxN": put(st["mask_SxN"], loss_W),
           "gen_SxN": put(st["gen_SxN"], live_W)}
    for name, x_W in zip(("logp_SxN", "sc_SxN", "entropy_SxN"), stats):
      out[name] = put(st[name], jnp.where(loss_W, x_W, 0.0))
    stop_W = jnp.any(tok_W[:, None] == stop_ids[None, :], axis=-1) & ~forced_W
    active_W = live_W & ~stop_W & (t_W + 1 < st["end_S"])
    # Token t goes in at position len + t and, for every row at once, at the ring column P + steps mod N: a row
    # lives at most N consecutive steps, so its tokens never overwrite each other, and a refill clears its
    # columns. Attention is over valid slots in any order (causal=False), so this is one batched decode_step.
    def forward(h_SxD, cache):
      h_Wx1xD, cache = decoder.decode_step(config, params, jnp.where(active_W, tok_W, pad)[:, None],
                                           (st["len_S"] + t_W)[:, None], active_W[:, None], cache,
                                           P + st["steps"] % N, causal=False)
      return h_Wx1xD[:, 0].astype(h_SxD.dtype), cache

    # No row goes on after this token (the usual last step): skip the forward pass that would feed it.
    h_SxD, cache = jax.lax.cond(jnp.any(active_W), forward, lambda h, c: (h, c), st["h_SxD"], st["cache"])
    st = {**st, **out, "cache": cache, "h_SxD": h_SxD, "active_S": active_W,
          "t_S": t_W + live_W, "steps": st["steps"] + 1, "generated": st["generated"] + jnp.sum(live_W)}
    return st, n + 1

  def cond(carry):
    st, n = carry
    live = jnp.sum(st["active_S"])
    return (live > 0) & (W - live < min_free) & (n < max_steps)

  state, _ = jax.lax.while_loop(cond, body, (state, jnp.int32(0)))
  return state


_refill_jit = jax.jit(_refill, static_argnames=("config",), donate_argnames=("state",))
_compact_jit = jax.jit(_compact)  # a narrower state cannot reuse the wider buffers
_decode_jit = jax.jit(_decode, static_argnames=("config", "sampling"), donate_argnames=("state",))
_unstack_jit = jax.jit(decoder.unstack_layers)  # once per run, so no jitted call re-slices the layer weights


def start_rows(config: ModelConfig, params: dict, state: dict, prompts: Sequence[Sequence[int]], slot_M, src_M, end_M,
               keys_M, pad: int) -> dict:
  """Prefill `prompts` in one call (rows padded to a bucket) and start row m in slot slot_M[m] from source src_M[m]
  (>= 0: that prompt; -1 - s: the prefix already in the state's slot s) with end step end_M[m] and key data
  keys_M[m]. Every slot in slot_M must be free; the state must be at full width (no rows gathered out)."""
  S, P = state["t_S"].shape[0], state["cache"]["valid"].shape[1] - state["tokens_SxN"].shape[1]
  R, M = len(prompts), len(slot_M)
  Rb = _bucket(R, S) if R else 0
  tokens_RxP = np.full((Rb, P), pad, np.int32)
  for i, prompt in enumerate(prompts):
    tokens_RxP[i, P - len(prompt):] = prompt
  lengths_R = np.asarray([len(p) for p in prompts] + [1] * (Rb - R))  # bucket padding rows: one pad token
  fill = lambda xs, v: np.asarray(list(xs) + [v] * (S - M), np.int32)
  src = fill([s if s >= 0 else Rb - 1 - s for s in src_M], 0)
  keys_M = np.concatenate([np.asarray(keys_M), np.zeros((S - M, *np.shape(keys_M)[1:]), np.asarray(keys_M).dtype)])
  return _refill_jit(config, params, state, tokens_RxP, np.arange(P)[None] >= P - lengths_R[:, None],
                     fill(slot_M, S), src, fill(end_M, 0), keys_M)


def warmup(config: ModelConfig, params: dict, sampling: SamplingConfig, slots: int, prompt_len: int) -> None:
  """Compile everything `run` can call for these shapes: a decode per width, a refill per prompt-row bucket (and
  none), a gather to each narrower width. After it, no mix of lengths, budgets or queue sizes compiles."""
  params = _unstack_jit(params)
  S, P = slots, prompt_len
  widths = buckets(S)
  state = init_state(config, sampling, S, P)
  no_keys = np.asarray(jax.random.key_data(jax.random.key(0)))[None][:0]
  for R in [0] + widths:
    state = start_rows(config, params, state, [[0]] * R, [], [], [], no_keys, 0)
  for W, narrower in zip(widths, widths[1:] + [None]):
    state = _decode_jit(config, sampling, params, state, 1, 0)
    if narrower:
      state = _compact_jit(state, np.arange(narrower, dtype=np.int32))
  jax.block_until_ready(state)


# ----------------------------------------------------------------------------- host scheduler


class RowOutput(NamedTuple):
  """One finished row (numpy, length N): what `SampleOutput` holds per row, plus gen (generated incl. injected)."""
  tokens: np.ndarray
  mask: np.ndarray
  gen: np.ndarray
  logp: np.ndarray
  self_certainty: np.ndarray
  entropy: np.ndarray


def _budgets(requests: Sequence[Request], sampling: SamplingConfig, P: int) -> list[np.ndarray]:
  """Each request's per-sample end step (its budget, capped by the interruption's end); raises on bad requests."""
  N = sampling.max_new_tokens
  end_cap = (sampling.think_budget + len(sampling.interrupt_token_ids) + sampling.answer_budget
             if sampling.think_budget else N)
  out = []
  for i, r in enumerate(requests):
    b = np.broadcast_to(np.asarray(N if r.max_new_tokens is None else r.max_new_tokens, np.int64), (r.num_samples,)
                        ) if r.num_samples >= 1 else np.zeros((0,), np.int64)
    if not 0 < len(r.prompt) <= P or r.num_samples < 1 or b.size == 0 or b.min() < 1 or b.max() > N:
      raise ValueError(f"request {i}: prompt of {len(r.prompt)} tokens must be in [1, prompt_len={P}], num_samples="
                       f"{r.num_samples} >= 1, max_new_tokens={r.max_new_tokens} in [1, {N}] (one or one per sample)")
    out.append(np.minimum(b, end_cap).astype(np.int32))
  return out


def run(config: ModelConfig, params: dict, requests: Sequence[Request], sampling: SamplingConfig, *, slots: int,
        prompt_len: int, key: jax.Array | None = None, refill_min_free: int = 1, max_steps: int = 1 << 30,
        drain_min_steps: int = 16) -> tuple[list[list[RowOutput]], RunStats]:
  """Generate every request's samples on `slots` decode slots; returns (per request, its rows in sample order; stats).

  prompt_len: the fixed padded prompt width P (prompts are left-padded to it; longer ones are refused).
  sampling.max_new_tokens is the slot width N and the cap on every request's budget. refill_min_free: decode until
  this many slots are free before refilling while requests wait (1: refill as soon as a row ends; more: fewer host
  round trips and bigger prefill batches). drain_min_steps: with the queue empty, gather the live rows into a
  narrower width only while some live row may still run this many steps (a gather, a host round trip and maybe a
  compile cost more than a few narrower steps save: quickstart-sized runs of 8 tokens decode in one call).
  Results depend only on each request's key, never on slots or neighbours.
  """
  sampler.check_interrupt(sampling)
  S, P, N = slots, prompt_len, sampling.max_new_tokens
  if S < 1 or P < 1 or not 1 <= refill_min_free <= S:
    raise ValueError(f"slots={S}, prompt_len={P} must be >= 1 and refill_min_free={refill_min_free} in [1, slots]")
  if P + N > config.max_position_embeddings:
    raise ValueError(f"prompt_len {P} + max_new_tokens {N} exceeds max_position_embeddings="
                     f"{config.max_position_embeddings}")
  pad = sampling.pad_id if sampling.pad_id is not None else (config.pad_token_id or 0)
  budgets = _budgets(requests, sampling, P)
  base_key = jax.random.key(0) if key is None else key
  folded = request_keys(base_key, len(requests)) if any(r.key is None for r in requests) else None
  req_keys = [folded[u] if r.key is None else r.key for u, r in enumerate(requests)]
  all_keys = np.asarray(jax.random.key_data(row_keys(req_keys, [r.num_samples for r in requests])))
  first_row = np.cumsum([0] + [r.num_samples for r in requests])
  t0 = time.perf_counter()
  stats = RunStats(slots=S)
  params = _unstack_jit(params)
  state = init_state(config, sampling, S, P)
  widths = buckets(S)
  W = S  # current decode width; it shrinks only once the queue is empty
  results: list[list[RowOutput | None]] = [[None] * r.num_samples for r in requests]
  queue = collections.deque(range(len(requests)))
  owner: dict[int, tuple[int, int]] = {}  # slot (in the current width) -> (request, sample)
  next_sample, head_slot = 0, -1  # the queue head's next sample to place, and a slot holding its prefix
  free = list(range(S))
  steps_seen = 0
  t_W = np.zeros(S, np.int64)
  # whether some live row may still run drain_min_steps steps (its budget minus its tokens so far)
  drains = lambda: max((budgets[u][g] - t_W[s] for s, (u, g) in owner.items()), default=0) >= drain_min_steps
  while queue or owner:
    if free and queue:
      fresh, slot_M, src_M, end_M, keys = [], [], [], [], []
      while free and queue:
        u = queue[0]
        r = requests[u]
        if next_sample == 0:
          fresh.append(u)
        src = len(fresh) - 1 if next_sample == 0 else -1 - head_slot  # -1 - s: the prefix in slot s
        take = min(len(free), r.num_samples - next_sample)
        placed = free[:take]
        free = free[take:]
        rk = all_keys[first_row[u]:first_row[u] + r.num_samples]
        for j, s in enumerate(placed):
          owner[s] = (u, next_sample + j)
          slot_M.append(s)
          src_M.append(src)
          end_M.append(budgets[u][next_sample + j])
          keys.append(rk[next_sample + j])
        next_sample += take
        head_slot = placed[0]
        if next_sample == r.num_samples:
          queue.popleft()
          next_sample, head_slot = 0, -1
      tr = time.perf_counter()
      state = start_rows(config, params, state, [requests[u].prompt for u in fresh], slot_M, src_M, end_M,
                         np.stack(keys), pad)
      jax.block_until_ready(state["active_S"])
      stats.refill_s += time.perf_counter() - tr
      stats.refills += 1
      stats.prefills += len(fresh)
    narrower = widths[widths.index(W) + 1] if W > 1 and drains() else 0
    min_free = refill_min_free if queue else W - narrower if narrower else W + 1
    td = time.perf_counter()
    state = _decode_jit(config, sampling, params, state, min_free, max_steps)
    active_W, t_W, steps = jax.device_get((state["active_S"], state["t_S"], state["steps"]))
    stats.decode_s += time.perf_counter() - td
    stats.decode_calls += 1
    stats.slot_steps += (int(steps) - steps_seen) * W
    steps_seen = int(steps)
    done = [s for s in owner if not active_W[s]]
    if done:
      tr = time.perf_counter()
      host = jax.device_get({k: state[k] for k in _OUTPUTS})
      d = np.asarray(done)
      keep_DxN = np.arange(N)[None] < np.asarray(t_W)[d][:, None]  # past a row's length: an earlier occupant's
      rows_D = zip(np.where(keep_DxN, host["tokens_SxN"][d], pad), host["mask_SxN"][d] & keep_DxN,
                   host["gen_SxN"][d] & keep_DxN, *(np.where(keep_DxN, host[k][d], 0.0)
                                                    for k in ("logp_SxN", "sc_SxN", "entropy_SxN")))
      for s, row in zip(done, rows_D):
        u, g = owner.pop(s)
        results[u][g] = RowOutput(*row)
        free.append(s)
      free.sort()
      stats.read_s += time.perf_counter() - tr
    while not queue and W > 1 and 0 < len(owner) <= widths[widths.index(W) + 1] and drains():
      # Drain: gather the live rows into the next narrower width (dead slots fill the rest).
      W = widths[widths.index(W) + 1]
      live = sorted(owner)
      rows_W = live + [s for s in range(len(active_W)) if s not in owner][:W - len(live)]
      state = _compact_jit(state, np.asarray(rows_W, np.int32))
      owner = {i: owner[s] for i, s in enumerate(live)}
      active_W = np.asarray(active_W)[rows_W]
      t_W = np.asarray(t_W)[rows_W]
      stats.compactions += 1
  stats.decode_steps, stats.generated = steps_seen, int(jax.device_get(state["generated"]))
  stats.wall_s = time.perf_counter() - t0
  return results, stats
