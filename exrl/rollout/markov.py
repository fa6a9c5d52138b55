"""Markovian chunked generation (Delethink, arXiv 2510.06557): think in chunks of C tokens with a bounded context.

Chunk 1 generates up to C tokens after the query q. While a trace has not stopped, chunk k > 1 starts from
q ⊕ carryover, where the carryover is m tokens: the first h response tokens (kept once) then the last m − h
response tokens so far, and generates up to C − m new tokens. At most I chunks; the thinking budget is
C + (I − 1)(C − m) tokens.

One KV cache of P + C slots (P: the padded query) serves every chunk of every trace: a chunk's prefix is
prefilled at slots [0, P + m) and its tokens written after it, so no slot past P + C is ever needed and
nothing is reallocated or cleared between chunks (a slot is only attended after it is rewritten). Memory is
constant and compute linear in the thinking length.

Every chunk's row is cache-slot aligned and has width S = P + C: chunk 1 is [q | C generated], chunk k > 1
is [q | m carried | C − m generated]. Rows of finished traces are masked (they cost compute until the whole
batch has stopped, not loss). Chunk 1 draws token t with fold_in(key, t), exactly as `sampler.sample`, so a
trace that ends inside chunk 1 is the plain sampler's trace; chunk k > 1 uses fold_in(fold_in(key, k − 1), t).

Shape suffixes: B batch, P padded query, I max chunks, C chunk size, S = P + C, M carryover m.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.rollout import sampler
from exrl.rollout.sampler import SamplingConfig


@dataclasses.dataclass(frozen=True)
class MarkovConfig:
  """Delethink's chunking: chunk_size C, carryover m (of which the first `head` response tokens, kept once),
  max_chunks I. The paper: C = 8192, m = C/2, head = 100, I = 5 (a 24k budget)."""
  chunk_size: int = 48
  carryover: int = 24
  head: int = 6
  max_chunks: int = 5

  def __post_init__(self):
    if self.max_chunks < 1:
      raise ValueError(f"MarkovConfig.max_chunks={self.max_chunks} must be >= 1")
    if self.carryover < 1:
      raise ValueError(f"MarkovConfig.carryover={self.carryover} must be >= 1 (m: tokens carried to the next chunk)")
    if self.chunk_size <= self.carryover:
      raise ValueError(f"MarkovConfig.chunk_size={self.chunk_size} must be > carryover={self.carryover}: "
                       f"each later chunk generates chunk_size - carryover new tokens")
    if not 0 <= self.head <= self.carryover:
      raise ValueError(f"MarkovConfig.head={self.head} must be in [0, carryover={self.carryover}]")

  @property
  def budget(self) -> int:
    """The most response tokens a trace can have: C + (I − 1)(C − m)."""
    return self.chunk_size + (self.max_chunks - 1) * (self.chunk_size - self.carryover)

  def check_fits(self, config: ModelConfig, prompt_len: int) -> None:
    """Raise unless a query of `prompt_len` tokens plus one chunk fits the model's positions."""
    if prompt_len + self.chunk_size > config.max_position_embeddings:
      raise ValueError(f"MarkovConfig.chunk_size={self.chunk_size} + a prompt of {prompt_len} tokens exceeds "
                       f"max_position_embeddings={config.max_position_embeddings}; the carryover "
                       f"(carryover={self.carryover}) and new tokens share the chunk's "
                       f"{config.max_position_embeddings - prompt_len} positions left after the prompt")

  @staticmethod
  def for_budget(budget: int, chunk_size: int, carryover: int, head: int) -> "MarkovConfig":
    """The config with the fewest chunks whose budget is >= `budget` tokens."""
    step = chunk_size - carryover
    return MarkovConfig(chunk_size, carryover, head, 1 + max(0, -(-(budget - chunk_size) // max(step, 1))))


class MarkovOutput(NamedTuple):
  """What `markov_sample` returns (device arrays). Chunk rows are cache-slot aligned, width S = P + C.

  tokens_BxIxS, valid_BxIxS, positions_BxIxS: each chunk's full context + generated tokens, ready for
  `decoder.hidden_states` (token s+1 predicted at s); rows of chunks that never ran are all-invalid.
  response_BxIxS: True on the tokens this chunk generated (up to and including a stop token).
  logp_BxIxS, self_certainty_BxIxS, entropy_BxIxS: float32 sampler statistics of each generated token at the
  sampling temperature (RL's old log-probs), 0 off `response`.
  num_chunks_B: chunks the trace used; lengths_B: response tokens over all chunks; stopped_B: it ended with
  a stop token (False: it ran out of budget).
  """
  tokens_BxIxS: jax.Array
  valid_BxIxS: jax.Array
  positions_BxIxS: jax.Array
  response_BxIxS: jax.Array
  logp_BxIxS: jax.Array
  self_certainty_BxIxS: jax.Array
  entropy_BxIxS: jax.Array
  num_chunks_B: jax.Array
  lengths_B: jax.Array
  stopped_B: jax.Array


def carryover(response_BxC: jax.Array, head_BxH: jax.Array, m: int) -> jax.Array:
  """The next chunk's carried tokens: the kept head ⊕ the last m − h tokens of the response so far.

  response_BxC is a finished chunk's response region (its last C context slots): for chunk 1 the C tokens
  it generated; for later chunks [head | previous tail | new], whose last C − h tokens are a contiguous
  suffix of the response, so its last m − h tokens are the response's last m − h.
  """
  h = head_BxH.shape[1]
  return jnp.concatenate([head_BxH, response_BxC[:, response_BxC.shape[1] - (m - h):]], axis=1)


def generate_markov(config: ModelConfig, sampling: SamplingConfig, markov: MarkovConfig, params: dict,
                    query_tokens_BxP: jax.Array, query_valid_BxP: jax.Array, key: jax.Array) -> MarkovOutput:
  """The traceable chunked sampler (no input checks; `markov_sample` is the checked, jitted entry point)."""
  B, P = query_tokens_BxP.shape
  C, m, h, I = markov.chunk_size, markov.carryover, markov.head, markov.max_chunks
  S = P + C
  q_BxP = query_tokens_BxP.astype(jnp.int32)
  qvalid_BxP = query_valid_BxP.astype(bool)
  params = decoder.unstack_layers(params)
  cache = decoder.init_cache(config, B, S, per_layer=True)  # the only KV cache, for every chunk

  def chunk_rows(prefix_BxQ, prefix_valid_BxQ, out):
    """One chunk's slot-aligned row arrays from its prefix and generated (tokens, mask, logp, sc, ent)."""
    tok, mask, *stats = out
    Q = prefix_BxQ.shape[1]
    valid = jnp.concatenate([prefix_valid_BxQ, mask], axis=1)
    resp = jnp.concatenate([jnp.zeros((B, Q), bool), mask], axis=1)
    pad_stat = lambda x: jnp.concatenate([jnp.zeros((B, Q), jnp.float32), x], axis=1)
    return (jnp.concatenate([prefix_BxQ, tok], axis=1), valid, resp, *(pad_stat(x) for x in stats))

  # Chunk 1: exactly the plain sampler's computation for C new tokens.
  not_done_B = jnp.zeros((B,), bool)
  out, cache, done_B = sampler.prefill_and_decode(config, sampling, params, cache, q_BxP, qvalid_BxP, key, C,
                                                  not_done_B)
  row = chunk_rows(q_BxP, qvalid_BxP, out)
  rows = tuple(jnp.zeros((B, I, S), x.dtype).at[:, 0].set(x) for x in row)
  head_BxH = row[0][:, P:P + h]
  carry_BxM = carryover(row[0][:, P:], head_BxH, m)
  chunks_B = jnp.ones((B,), jnp.int32)
  prefix_valid_BxQ = jnp.concatenate([qvalid_BxP, jnp.ones((B, m), bool)], axis=1)

  def cond(c):
    k, done_B, *_ = c
    return (k < I) & ~jnp.all(done_B)

  def body(c):
    k, done_B, chunks_B, carry_BxM, cache, rows = c
    prefix_BxQ = jnp.concatenate([q_BxP, carry_BxM], axis=1)
    out, cache, new_done_B = sampler.prefill_and_decode(
        config, sampling, params, cache, prefix_BxQ, prefix_valid_BxQ, jax.random.fold_in(key, k), C - m, done_B)
    row = chunk_rows(prefix_BxQ, prefix_valid_BxQ, out)
    # A finished trace's later rows stay all-invalid (the zeros they were made with).
    row = tuple(jnp.where(done_B.reshape((B,) + (1,) * (x.ndim - 1)), jnp.zeros_like(x), x) for x in row)
    rows = tuple(jax.lax.dynamic_update_slice(r, x[:, None], (0, k, 0)) for r, x in zip(rows, row))
    chunks_B = chunks_B + (~done_B).astype(jnp.int32)
    return k + 1, new_done_B, chunks_B, carryover(row[0][:, P:], head_BxH, m), cache, rows

  _, done_B, chunks_B, _, _, rows = jax.lax.while_loop(
      cond, body, (jnp.int32(1), done_B, chunks_B, carry_BxM, cache, rows))
  tokens, valid, resp, logp, sc, ent = rows
  positions = decoder.default_positions(valid.reshape(B * I, S)).reshape(B, I, S)
  return MarkovOutput(tokens_BxIxS=tokens, valid_BxIxS=valid, positions_BxIxS=positions, response_BxIxS=resp,
                      logp_BxIxS=logp, self_certainty_BxIxS=sc, entropy_BxIxS=ent, num_chunks_B=chunks_B,
                      lengths_B=jnp.sum(resp, axis=(1, 2), dtype=jnp.int32), stopped_B=done_B)


_generate_jit = jax.jit(generate_markov, static_argnames=("config", "sampling", "markov"))


def markov_sample(config: ModelConfig, params: dict, query_tokens_BxP, query_valid_BxP, key: jax.Array,
                  sampling: SamplingConfig, markov: MarkovConfig) -> MarkovOutput:
  """Delethink rollouts of left-padded queries (see `sampler.pad_prompts`); jitted per shape bucket.

  `sampling.max_new_tokens` is ignored: the chunking sets the budget. Deterministic in `key`.
  """
  sampler.check_inputs(config, query_tokens_BxP, query_valid_BxP, dataclasses.replace(sampling, max_new_tokens=1))
  markov.check_fits(config, int(np.asarray(query_valid_BxP).sum(1).max()))
  return _generate_jit(config, sampling, markov, params, jnp.asarray(query_tokens_BxP),
                       jnp.asarray(query_valid_BxP), key)


def kv_cache_bytes(config: ModelConfig, batch: int, slots: int) -> int:
  """Bytes of the KV cache `init_cache(config, batch, slots)` allocates (keys, values and the valid mask)."""
  cache = jax.eval_shape(functools.partial(decoder.init_cache, config, batch, slots, per_layer=True))
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(cache))


def response_tokens(out: MarkovOutput) -> list[list[int]]:
  """Host: each trace's whole response (every chunk's generated tokens, in order)."""
  tokens, resp = jax.device_get((out.tokens_BxIxS, out.response_BxIxS))
  return [tokens[b][resp[b]].tolist() for b in range(tokens.shape[0])]


def chunk_examples(query_ids: list[int], response_ids: list[int],
                   markov: MarkovConfig) -> list[tuple[list[int], list[float]]]:
  """Host: a written trace cut the way Delethink would generate it, as SFT rows (ids, loss mask).

  Chunk 1 is query ⊕ the first C response tokens; chunk k ≥ 2 starts at response offset t = C + (k−2)(C − m)
  and is query ⊕ response[:h] ⊕ response[t−(m−h):t] ⊕ the next C − m tokens. The mask marks the generated
  part. Only the chunk that reaches the end of `response_ids` (which should end in eos) teaches stopping, so
  a base trained on these continues a trace from any carryover (R1-Distill does it zero-shot, arXiv 2510.06557).
  Every chunk of the trace is returned, however many: the trace need not fit `max_chunks`.
  """
  C, m, h = markov.chunk_size, markov.carryover, markov.head
  q, r = list(query_ids), list(response_ids)
  out = [(q + r[:C], [0.0] * len(q) + [1.0] * len(r[:C]))]
  for t in range(C, len(r), C - m):
    ctx = q + r[:h] + r[t - (m - h):t]
    new = r[t:t + C - m]
    out.append((ctx + new, [0.0] * len(ctx) + [1.0] * len(new)))
  return out


def segments(out: MarkovOutput) -> list[list[dict]]:
  """Host: per trace, its chunks as {"prompt": ids, "generated": ids, "logp": float32[n]} (prompt = q ⊕ carry)."""
  tokens, valid, resp, logp, n_B = jax.device_get(
      (out.tokens_BxIxS, out.valid_BxIxS, out.response_BxIxS, out.logp_BxIxS, out.num_chunks_B))
  return [[{"prompt": tokens[b, k][valid[b, k] & ~resp[b, k]].tolist(),
            "generated": tokens[b, k][resp[b, k]].tolist(), "logp": logp[b, k][resp[b, k]]}
           for k in range(int(n_B[b]))] for b in range(tokens.shape[0])]
