"""Jitted batched sampling with a KV cache: one prefill pass, then a decode loop inside jit.

Prompts are LEFT-padded (the decoder's cache numbers slots the same for every row), so the
prompt fills slots [0, P) and completion token t sits at slot P + t. Each row's positions
skip its padding: the prompt is 0..len-1 and completion token t is at position len + t.

`sample` compiles once per (batch, prompt length, SamplingConfig, ModelConfig); use
`pad_prompts` to bucket prompt lengths so ragged prompt sets reuse a few compiled shapes.

Shape suffixes: B batch, P padded prompt length, N max_new_tokens, S = P + N, V vocab, K top-k.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from exrl.models import decoder
from exrl.models.config import ModelConfig

_CDF_CHUNK = 128  # vocab chunk for the two-level inverse-CDF draw (a cumsum over V is slow on CPU).


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick tokens. Hashable: it is a static argument of the jitted sampler.

  temperature scales the logits: tokens are drawn from, and log-probs, entropy and self-certainty are
  reported for, softmax(logits / temperature), as TRL and verl compute the PPO ratio (greedy: T = 1).
  top_k=0 means no top-k cut; top_p=1 means no nucleus cut. Generation of a row stops after
  the first token in `stop_token_ids`. pad_id fills completion slots after a stop
  (None: the model's pad_token_id, else 0).

  head_dtype: the dtype the decode loop reads the LM head in (None: the model's compute dtype), with float32
  accumulation either way. "bfloat16" halves the bytes of the largest matrix of a small model and, on CPUs with
  bf16 dot instructions, halves its time (the sampler runs ~15% faster on bench_sampler's model); tokens,
  log-probs and statistics then describe the bf16-head distribution, which differs from the training forward's
  by the weights' rounding (a small rollout/trainer mismatch, as with a bf16 inference engine).

  engine: "static" (`sample`: a batch decodes until its longest row stops) or "continuous" (`exrl.rollout.continuous`:
  `slots` decode slots refilled as rows finish); `exrl.rollout.engine.generate` dispatches on it.
  ScaleRL's length interruption (arXiv 2510.13786): when think_budget > 0, a row that has not stopped after
  think_budget tokens gets `interrupt_token_ids` appended (mask 0: no loss; the caller turns `interrupt_text` into
  ids with `with_interrupt_tokens`), then at most answer_budget more sampled tokens.

  layer_loop: how the decode loop runs the layers. "unroll" unstacks them once per call (a copy of every layer
  weight, and the tied head transposed: fastest for small models, 1.7x the tokens/s of "scan" on the quickstart's
  4-layer model on CPU); "scan" slices one layer at a time from the stacked weights (no copy: what a 0.5B+ model
  needs to fit). "auto" unrolls when a float32 copy of the layer weights is at most UNROLL_MAX_BYTES.
  """
  max_new_tokens: int = 128
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_token_ids: tuple[int, ...] = ()
  greedy: bool = False
  pad_id: int | None = None
  head_dtype: str | None = None
  engine: Literal["static", "continuous"] = "static"
  # continuous engine: decode slots, capped at a call's rows. 0: one per row, the static batch's KV memory (fewer
  # slots than rows refill freed slots from a queue, which pays off for long-tailed lengths: docs/rollout.md)
  slots: int = 0
  think_budget: int = 0  # 0: no length interruption
  interrupt_text: str = "Time is up. The final answer is"
  layer_loop: Literal["auto", "unroll", "scan"] = "auto"
  interrupt_token_ids: tuple[int, ...] = ()
  answer_budget: int = 16

  def __post_init__(self):
    # A list would make the config unhashable, so normalise to a tuple of ints.
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
    object.__setattr__(self, "interrupt_token_ids", tuple(int(t) for t in self.interrupt_token_ids))
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens}; must be >= 1")
    if not self.greedy and not self.temperature > 0:
      raise ValueError(f"temperature={self.temperature}; must be > 0 (use greedy=True for argmax decoding)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k}; must be >= 0 (0 disables top-k)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p}; must be in (0, 1] (1 disables nucleus sampling)")
    if self.head_dtype not in (None, "float32", "bfloat16"):
      raise ValueError(f"head_dtype={self.head_dtype!r}; must be None (the model's compute dtype), 'float32' or "
                       f"'bfloat16'")
    if self.engine not in ("static", "continuous"):
      raise ValueError(f"engine={self.engine!r}; must be 'static' or 'continuous'")
    if self.slots < 0:
      raise ValueError(f"slots={self.slots}; must be >= 1, or 0 for one slot per row of a call")
    if self.think_budget < 0 or self.answer_budget < 1:
      raise ValueError(f"think_budget={self.think_budget} must be >= 0 (0: off) and answer_budget="
                       f"{self.answer_budget} >= 1")
    total = self.think_budget + len(self.interrupt_token_ids) + self.answer_budget
    if self.think_budget and self.interrupt_token_ids and total > self.max_new_tokens:
      raise ValueError(f"think_budget + len(interrupt_token_ids) + answer_budget = {total} exceeds max_new_tokens="
                       f"{self.max_new_tokens}")


def with_interrupt_tokens(sampling: SamplingConfig, encode) -> SamplingConfig:
  """`sampling` with interrupt_token_ids = encode(interrupt_text) when length interruption is on and ids are unset."""
  if not sampling.think_budget or sampling.interrupt_token_ids:
    return sampling
  ids = tuple(int(i) for i in encode(sampling.interrupt_text))
  if not ids:
    raise ValueError(f"interrupt_text={sampling.interrupt_text!r} encodes to no tokens; length interruption needs some")
  return dataclasses.replace(sampling, interrupt_token_ids=ids)


class SampleOutput(NamedTuple):
  """What `sample` returns (all device arrays).

  tokens_BxN: int32 completion tokens, pad_id after a stop. mask_BxN: True for generated tokens
  up to and including the stop token (False on injected interruption tokens: no loss). logp_BxN: float32 log-prob of each sampled token under the
  full-vocab distribution at the sampling temperature (before top-k / top-p; RL's old log-probs), 0
  where masked. lengths_B: int32 number of generated tokens (injected ones included). seq_*_BxS: prompt + completion
  (S = P + N) with its valid mask and positions, ready for `decoder.hidden_states` to re-score; seq
  token s+1 is predicted at s. self_certainty_BxN and entropy_BxN: float32 KL(U ‖ p) and H(p) in nats
  of the distribution each token was drawn from (same temperature), 0 where masked.
  """
  tokens_BxN: jax.Array
  mask_BxN: jax.Array
  logp_BxN: jax.Array
  lengths_B: jax.Array
  seq_tokens_BxS: jax.Array
  seq_valid_BxS: jax.Array
  seq_positions_BxS: jax.Array
  self_certainty_BxN: jax.Array
  entropy_BxN: jax.Array


# ----------------------------------------------------------------------------- host helpers


def bucket_length(n: int, bucket: int | str = 16) -> int:
  """Round n up to a multiple of `bucket` (int) or to a power of two (bucket="pow2")."""
  if bucket == "pow2":
    return 1 << max(n - 1, 0).bit_length()
  if not isinstance(bucket, int) or bucket < 1:
    raise ValueError(f"bucket={bucket!r}; must be a positive int or 'pow2'")
  return -(-n // bucket) * bucket


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int | str = 16
                ) -> tuple[np.ndarray, np.ndarray]:
  """Left-pad token lists to a bucketed length: (int32 tokens_BxP, bool valid_BxP) numpy arrays."""
  if len(prompts) == 0:
    raise ValueError("pad_prompts got an empty list of prompts; need at least one")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. bos)")
  P = bucket_length(max(len(p) for p in prompts), bucket)
  tokens = np.full((len(prompts), P), pad_id, np.int32)
  valid = np.zeros((len(prompts), P), bool)
  for i, p in enumerate(prompts):
    tokens[i, P - len(p):] = np.asarray(p, np.int32)
    valid[i, P - len(p):] = True
  return tokens, valid


# ----------------------------------------------------------------------------- token choice


def _argmax(x_BxV: jax.Array) -> jax.Array:
  """First index of the row max; two plain reductions, ~3x cheaper than XLA:CPU's argmax."""
  V = x_BxV.shape[-1]
  hit_BxV = x_BxV == jnp.max(x_BxV, axis=-1, keepdims=True)
  return jnp.min(jnp.where(hit_BxV, jnp.arange(V, dtype=jnp.int32), V), axis=-1).astype(jnp.int32)


def _last_positive(x_BxN: jax.Array) -> jax.Array:
  """Index of the last entry > 0 in each row (0 if none)."""
  return jnp.max(jnp.where(x_BxN > 0, jnp.arange(x_BxN.shape[-1], dtype=jnp.int32), 0), axis=-1)


def _draw(probs_BxN: jax.Array, u_B: jax.Array) -> jax.Array:
  """Inverse-CDF draw over a short axis: smallest i with cdf[i] > u * total, never a zero-prob slot."""
  cdf_BxN = jnp.cumsum(probs_BxN, axis=-1)
  i_B = jnp.sum(cdf_BxN <= (u_B * cdf_BxN[:, -1])[:, None], axis=-1, dtype=jnp.int32)
  # u * total can round up to total; then take the last slot that has mass.
  return jnp.minimum(i_B, _last_positive(probs_BxN))


def _inverse_cdf(probs_BxV: jax.Array, u_B: jax.Array) -> jax.Array:
  """One categorical draw per row from unnormalised probs with a single uniform u_B in [0, 1).

  Two levels (pick a chunk of the vocab by its mass, then a token inside it), because a cumsum
  over the whole vocab is slow on CPU and Gumbel noise needs V random numbers per row.
  """
  B, V = probs_BxV.shape
  C = -(-V // _CDF_CHUNK)
  probs_BxCxW = jnp.pad(probs_BxV, ((0, 0), (0, C * _CDF_CHUNK - V))).reshape(B, C, _CDF_CHUNK)
  mass_BxC = probs_BxCxW.sum(-1)
  cdf_BxC = jnp.cumsum(mass_BxC, axis=-1)
  target_B = u_B * cdf_BxC[:, -1]
  c_B = jnp.minimum(jnp.sum(cdf_BxC <= target_B[:, None], axis=-1, dtype=jnp.int32), _last_positive(mass_BxC))
  chunk_BxW = jnp.take_along_axis(probs_BxCxW, c_B[:, None, None], 1)[:, 0]
  # Where in the chunk the target falls, as a fraction of the chunk's mass.
  before_B = jnp.take_along_axis(cdf_BxC, c_B[:, None], 1)[:, 0] - jnp.take_along_axis(mass_BxC, c_B[:, None], 1)[:, 0]
  frac_B = jnp.clip((target_B - before_B) / jnp.take_along_axis(mass_BxC, c_B[:, None], 1)[:, 0], 0.0, 1.0)
  return c_B * _CDF_CHUNK + _draw(chunk_BxW, frac_B)


def _nucleus(logits_BxK: jax.Array, top_p: float) -> jax.Array:
  """Mask (to -inf) sorted-descending candidates outside the smallest set with mass >= top_p."""
  probs = jax.nn.softmax(logits_BxK, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  return jnp.where(mass_before < top_p, logits_BxK, -jnp.inf)


def top_k_indices(x_BxV: jax.Array, k: int) -> jax.Array:
  """Indices of the k largest entries per row, in descending order (ties: lower index first).

  The barriers keep XLA:CPU on its TopK kernel: when the top-k values flow into later math, it otherwise
  lowers `lax.top_k` to a full sort of the row (measured 114 ms instead of 1.3 ms per call at [16, 32000],
  k = 50, which made top-k sampling 17x slower than plain sampling).
  """
  _, idx_BxK = jax.lax.top_k(jax.lax.optimization_barrier(x_BxV), k)
  return jax.lax.optimization_barrier(idx_BxK)


def is_row_keys(key: jax.Array) -> bool:
  """Whether `key` is a batch of PRNG keys (typed [B] or raw uint32 [B, 2]) rather than one key."""
  return key.ndim == (1 if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else 2)


def step_key(key: jax.Array, t) -> jax.Array:
  """fold_in(key, t) for one key, or for each of a batch of row keys (t: one step, or one per row)."""
  if is_row_keys(key):
    return jax.vmap(jax.random.fold_in, in_axes=(0, 0 if jnp.ndim(t) else None))(key, t)
  return jax.random.fold_in(key, t)


def interrupt(t_B: jax.Array, tok_B: jax.Array, sampling: SamplingConfig) -> tuple[jax.Array, jax.Array]:
  """ScaleRL length interruption at per-row step t_B: (tokens with the interruption ids forced in
  [think_budget, think_budget + m), forced_B). Only rows still running reach those steps."""
  ids = jnp.asarray(sampling.interrupt_token_ids, jnp.int32)
  j_B = t_B - sampling.think_budget
  forced_B = (j_B >= 0) & (j_B < ids.shape[0])
  return jnp.where(forced_B, ids[jnp.clip(j_B, 0, ids.shape[0] - 1)], tok_B), forced_B


def check_interrupt(sampling: SamplingConfig) -> None:
  if sampling.think_budget and not sampling.interrupt_token_ids:
    raise ValueError(f"think_budget={sampling.think_budget} but interrupt_token_ids is empty; resolve "
                     f"interrupt_text={sampling.interrupt_text!r} with sampler.with_interrupt_tokens(sampling, encode)")


def choose_tokens(logits_BxV: jax.Array, key: jax.Array, sampling: SamplingConfig
                  ) -> tuple[jax.Array, jax.Array]:
  """Pick one token per row; returns (int32 tokens_B, float32 log-probs_B at the sampling temperature)."""
  tok_B, logp_B, _, _ = choose_tokens_with_stats(logits_BxV, key, sampling)
  return tok_B, logp_B


def choose_tokens_with_stats(logits_BxV: jax.Array, key: jax.Array, sampling: SamplingConfig):
  """Pick one token per row; returns (tokens_B, logp_B, self_certainty_B, entropy_B).

  The statistics are of softmax(logits / T) over the full vocabulary (T = 1 when greedy); one pass of
  exp over the vocabulary serves the draw and all three. key: one key, or one per row (`is_row_keys`).
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  B, V = logits_BxV.shape
  t = 1.0 if sampling.greedy else sampling.temperature
  z_BxV = logits_BxV if t == 1.0 else logits_BxV / t
  max_Bx1 = jnp.max(z_BxV, axis=-1, keepdims=True)
  exp_BxV = jnp.exp(z_BxV - max_Bx1)  # also the unnormalised sampling probs
  sum_B = jnp.sum(exp_BxV, axis=-1)
  lse_B = max_Bx1[:, 0] + jnp.log(sum_B)
  sc_B = lse_B - jnp.mean(z_BxV, axis=-1) - jnp.log(jnp.float32(V))
  entropy_B = lse_B - jnp.sum(exp_BxV * z_BxV, axis=-1) / sum_B
  if sampling.greedy:
    tok_B = _argmax(logits_BxV)
  else:
    if is_row_keys(key):  # one key per row: a row's draw does not depend on its batch neighbours
      u_B = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(key)
    else:
      u_B = jax.random.uniform(key, (B,), jnp.float32)
    if sampling.top_k or sampling.top_p < 1:
      # Sorted candidates: the top-k, or the whole vocab only when nucleus needs it.
      idx_BxK = top_k_indices(z_BxV, min(sampling.top_k or V, V))
      vals_BxK = jnp.take_along_axis(z_BxV, idx_BxK, 1)
      if sampling.top_p < 1:
        vals_BxK = _nucleus(vals_BxK, sampling.top_p)
      j_B = _draw(jnp.exp(vals_BxK - vals_BxK[:, :1]), u_B)  # column 0 is the max
      tok_B = jnp.take_along_axis(idx_BxK, j_B[:, None], 1)[:, 0].astype(jnp.int32)
    else:
      tok_B = _inverse_cdf(exp_BxV, u_B)
  logp_B = jnp.take_along_axis(z_BxV, tok_B[:, None], 1)[:, 0] - lse_B
  return tok_B, logp_B, sc_B, entropy_B


# ----------------------------------------------------------------------------- the sampler

UNROLL_MAX_BYTES = 256 << 20  # layer_loop="auto": unroll (copy the layer weights) only below this


def unrolls(sampling: SamplingConfig, params: dict) -> bool:
  """Whether the decode loop runs unstacked (copied) layers; see SamplingConfig.layer_loop."""
  if sampling.layer_loop not in ("auto", "unroll", "scan"):
    raise ValueError(f"SamplingConfig.layer_loop={sampling.layer_loop!r}; valid: auto, unroll, scan")
  if sampling.layer_loop != "auto":
    return sampling.layer_loop == "unroll"
  return 4 * sum(x.size for x in jax.tree.leaves(params["layers"])) <= UNROLL_MAX_BYTES


TRACE_COUNT = [0]  # bumped each time `generate` is traced; tests use it to check compile caching.


def generate(config: ModelConfig, sampling: SamplingConfig, params: dict, prompt_tokens_UxP: jax.Array,
             prompt_valid_UxP: jax.Array, key: jax.Array, num_samples: int = 1,
             budget_B: jax.Array | None = None) -> SampleOutput:
  """The traceable sampler (no input checks; `sample` is the checked, jitted entry point).

  Each of the U prompts is prefilled once and sampled `num_samples` times: B = U * num_samples output rows,
  a prompt's samples adjacent (row b is prompt b // num_samples). key: one key, or B row keys.
  budget_B: optional per-row cap on new tokens (<= max_new_tokens).
  """
  TRACE_COUNT[0] += 1
  U, P = prompt_tokens_UxP.shape
  B, N = U * num_samples, sampling.max_new_tokens
  prompt_tokens_UxP, prompt_valid_UxP = prompt_tokens_UxP.astype(jnp.int32), prompt_valid_UxP.astype(bool)
  unroll = unrolls(sampling, params)
  if unroll:  # once, outside the loop, so no decode step slices (copies) layer weights or the cache
    params = decoder.unstack_layers(params)
  cache = decoder.init_cache(config, U, P + N, per_layer=unroll)
  out, _, _ = prefill_and_decode(config, sampling, params, cache, prompt_tokens_UxP, prompt_valid_UxP, key, N,
                                 jnp.zeros((B,), bool), num_samples, budget_B=budget_B, interruptible=True)
  tokens_BxN, mask_BxN, logp_BxN, sc_BxN, entropy_BxN = out[:5]
  gen_BxN = out[5] if sampling.think_budget else mask_BxN  # generated, injected interruption tokens included
  prompt_tokens_BxP = jnp.repeat(prompt_tokens_UxP, num_samples, axis=0)
  prompt_valid_BxP = jnp.repeat(prompt_valid_UxP, num_samples, axis=0)
  seq_valid_BxS = jnp.concatenate([prompt_valid_BxP, gen_BxN], axis=1)
  return SampleOutput(
      tokens_BxN=tokens_BxN, mask_BxN=mask_BxN, logp_BxN=logp_BxN,
      lengths_B=jnp.sum(gen_BxN, axis=1, dtype=jnp.int32),
      seq_tokens_BxS=jnp.concatenate([prompt_tokens_BxP, tokens_BxN], axis=1),
      seq_valid_BxS=seq_valid_BxS, seq_positions_BxS=decoder.default_positions(seq_valid_BxS),
      self_certainty_BxN=sc_BxN, entropy_BxN=entropy_BxN)


def prefill_and_decode(config: ModelConfig, sampling: SamplingConfig, params: dict, cache: dict,
                       prefix_tokens_UxQ: jax.Array, prefix_valid_UxQ: jax.Array, key: jax.Array, num_new: int,
                       done_B: jax.Array, num_samples: int = 1, budget_B: jax.Array | None = None,
                       interruptible: bool = False):
  """Prefill a left-padded prefix at cache slots [0, Q), then sample up to `num_new` tokens at slots Q, Q+1, ...

  params stacked with a stacked `init_cache` (a scan over the layers: no copy of the weights), or from
  `decoder.unstack_layers` with `init_cache(per_layer=True)`; the cache for the U prefixes, with at least
  Q + num_new slots. Slots past the prefix are only ever seen after they are written, so a cache can be reused
  without clearing. Each prefix is prefilled once, then its cache is repeated for `num_samples` rows
  (B = U * num_samples, adjacent). Rows with done_B already True emit nothing (pad, mask False). Token t is
  drawn with fold_in(key, t) (key: one key, or B row keys). budget_B: optional per-row cap on new tokens.
  Returns ((tokens, mask, logp, self_certainty, entropy), each [B, num_new], plus the generated mask (injected
  tokens included) when sampling.think_budget; the [B]-row cache; done_B). Length interruption counts steps from
  token 0 of this call, so only callers that start a completion here (interruptible=True) may enable it.
  """
  if sampling.think_budget and not interruptible:
    raise ValueError(f"think_budget={sampling.think_budget}: length interruption is supported by sampler.sample and "
                     f"the continuous engine, not by this caller (e.g. Delethink chunks)")
  U, Q = prefix_tokens_UxQ.shape
  B, N = U * num_samples, num_new
  pad = sampling.pad_id if sampling.pad_id is not None else (config.pad_token_id or 0)
  stop_ids = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)

  # Prefill: the whole prefix in one pass; the last slot (always valid when left-padded) predicts token 0.
  h_UxQxD, cache = decoder.decode_step(config, params, prefix_tokens_UxQ,
                                       decoder.default_positions(prefix_valid_UxQ), prefix_valid_UxQ, cache, 0)
  rows = lambda x: x if num_samples == 1 else jnp.repeat(x, num_samples, axis=0)
  cache = jax.tree.map(rows, cache) if isinstance(cache["k"], (tuple, list)) else {
      "k": jnp.repeat(cache["k"], num_samples, axis=1), "v": jnp.repeat(cache["v"], num_samples, axis=1),
      "valid": rows(cache["valid"])}
  h_Bx1xD, prefix_len_B = rows(h_UxQxD[:, -1:]), rows(jnp.sum(prefix_valid_UxQ, axis=1, dtype=jnp.int32))
  # Scanned (big) models read a tied head in its stored VxD layout: a transposed copy would be the largest temp
  # buffer; unrolled (small) ones transpose it once, outside the loop (the faster dot on CPU).
  head_dtype = sampling.head_dtype or config.dtype
  if config.tie_word_embeddings and not unrolls(sampling, params):
    w_VxD = params["embed"].astype(head_dtype)
    project = lambda h_BxD: jnp.einsum("bd,vd->bv", h_BxD.astype(head_dtype), w_VxD,
                                       preferred_element_type=jnp.float32)
  else:
    w_DxV = decoder.unembed_matrix(config, params).astype(head_dtype)
    project = lambda h_BxD: jnp.einsum("bd,dv->bv", h_BxD.astype(head_dtype), w_DxV,
                                       preferred_element_type=jnp.float32)
  logits_BxV = project(h_Bx1xD[:, 0])

  def emit(t, choice, done_B, out):
    """Write step t's choice (pad / 0 for finished rows) into `out` and update the done flags.

    choice: (tok_B, logp_B, sc_B, entropy_B); out: (tokens_BxN, mask_BxN, logp_BxN, sc_BxN, entropy_BxN).
    """
    tok_B = jnp.where(done_B, pad, choice[0])
    if not sampling.think_budget:
      stats = [jnp.where(done_B, 0.0, x_B) for x_B in choice[1:]]
      write = lambda x_BxN, x_B: jax.lax.dynamic_update_slice(x_BxN, x_B[:, None].astype(x_BxN.dtype), (0, t))
      out = tuple(write(x_BxN, x_B) for x_BxN, x_B in zip(out, [tok_B, ~done_B, *stats]))
      new_done_B = done_B | jnp.any(tok_B[:, None] == stop_ids[None, :], axis=-1)
    else:
      tok_B, forced_B = interrupt(jnp.full((B,), t, jnp.int32), tok_B, sampling)
      tok_B = jnp.where(done_B, pad, tok_B)
      loss_B = ~done_B & ~forced_B
      stats = [jnp.where(loss_B, x_B, 0.0) for x_B in choice[1:]]
      write = lambda x_BxN, x_B: jax.lax.dynamic_update_slice(x_BxN, x_B[:, None].astype(x_BxN.dtype), (0, t))
      out = tuple(write(x_BxN, x_B) for x_BxN, x_B in zip(out, [tok_B, loss_B, *stats, ~done_B]))
      stop_B = jnp.any(tok_B[:, None] == stop_ids[None, :], axis=-1) & ~forced_B
      end = sampling.think_budget + len(sampling.interrupt_token_ids) + sampling.answer_budget
      new_done_B = done_B | stop_B | (t + 1 >= end)
    if budget_B is not None:
      new_done_B = new_done_B | (t + 1 >= budget_B)
    return tok_B, new_done_B, out

  zeros = lambda dt: jnp.zeros((B, N), dt)
  out = (zeros(jnp.int32), zeros(bool), zeros(jnp.float32), zeros(jnp.float32), zeros(jnp.float32))
  out = out + (zeros(bool),) if sampling.think_budget else out
  choice = choose_tokens_with_stats(logits_BxV, step_key(key, 0), sampling)
  tok_B, done_B, out = emit(0, choice, done_B, out)

  def cond(carry):
    t, _, done_B, *_ = carry
    return (t < N) & ~jnp.all(done_B)

  def body(carry):
    t, prev_tok_B, done_B, cache, out = carry
    # Token t-1 goes in at slot Q+t-1 and position len+t-1; it predicts token t.
    h_Bx1xD, cache = decoder.decode_step(config, params, prev_tok_B[:, None], (prefix_len_B + t - 1)[:, None],
                                         jnp.ones((B, 1), bool), cache, Q + t - 1)
    choice = choose_tokens_with_stats(project(h_Bx1xD[:, 0]), step_key(key, t), sampling)
    tok_B, done_B, out = emit(t, choice, done_B, out)
    return t + 1, tok_B, done_B, cache, out

  carry = (jnp.int32(1), tok_B, done_B, cache, out)
  _, _, done_B, cache, out = jax.lax.while_loop(cond, body, carry)
  return out, cache, done_B


_generate_jit = jax.jit(generate, static_argnames=("config", "sampling", "num_samples"))


def check_inputs(config: ModelConfig, tokens, valid, sampling: SamplingConfig) -> None:
  """Raise ValueError on prompts `sample` cannot take (shapes, empty rows, right padding, too long, bad ids)."""
  if tokens.ndim != 2 or tokens.shape != valid.shape:
    raise ValueError(f"prompt_tokens_BxP {tokens.shape} and prompt_valid_BxP {valid.shape} must be equal 2-D shapes")
  B, P = tokens.shape
  if B == 0:
    raise ValueError("empty batch: prompt_tokens_BxP has batch size 0; need at least one prompt")
  if P == 0:
    raise ValueError("prompt length 0: every prompt needs at least one token (e.g. bos)")
  if sampling.top_k > config.vocab_size:
    raise ValueError(f"top_k={sampling.top_k} exceeds vocab_size={config.vocab_size}")
  if isinstance(valid, jax.Array) and not valid.is_fully_addressable:  # multi-host: check this process's rows
    valid, tokens = (np.concatenate([np.asarray(s.data) for s in x.addressable_shards]) for x in (valid, tokens))
  try:
    valid = np.asarray(valid, bool)
  except jax.errors.TracerArrayConversionError:
    return  # called under a trace: the value checks below need concrete data
  lengths = valid.sum(1)
  if (lengths == 0).any():
    raise ValueError(f"prompt rows {np.flatnonzero(lengths == 0).tolist()} have no valid tokens")
  left_padded = (np.cumsum(valid, 1) == np.maximum(np.arange(P)[None] - (P - lengths[:, None]) + 1, 0)).all()
  if not left_padded:
    raise ValueError("prompts must be LEFT-padded (valid tokens contiguous at the end); use pad_prompts")
  longest = int(lengths.max())
  limit = config.max_position_embeddings
  if longest > limit:
    raise ValueError(f"prompt of {longest} tokens is longer than max_position_embeddings={limit}")
  if longest + sampling.max_new_tokens > limit:
    raise ValueError(f"prompt of {longest} tokens + max_new_tokens={sampling.max_new_tokens} = "
                     f"{longest + sampling.max_new_tokens} exceeds max_position_embeddings={limit}")
  tokens = np.asarray(tokens)
  if (tokens[valid] < 0).any() or (tokens[valid] >= config.vocab_size).any():
    raise ValueError(f"prompt token ids must be in [0, {config.vocab_size}); found "
                     f"[{tokens[valid].min()}, {tokens[valid].max()}]")


def sample(config: ModelConfig, params: dict, prompt_tokens_UxP, prompt_valid_UxP, key: jax.Array,
           sampling: SamplingConfig = SamplingConfig(), num_samples: int = 1, *, keys_B: jax.Array | None = None,
           budget_B=None) -> SampleOutput:
  """Sample `num_samples` completions of each left-padded prompt (see `pad_prompts`); jitted per shape bucket.

  prompt_tokens_UxP int, prompt_valid_UxP bool (False on the left padding). The output has U * num_samples
  rows, a prompt's samples adjacent; each prompt is prefilled once (a GRPO group shares its prompt's cache), and
  the result equals sampling the prompts repeated row by row. Deterministic in `key`.
  keys_B: per-row keys instead of `key` (row b draws token t with fold_in(keys_B[b], t), so a row's tokens do not
  depend on its neighbours: what the continuous engine does); budget_B: per-row caps on new tokens.
  Raises ValueError on bad input (empty batch, right padding, too-long prompts, num_samples < 1, ...).
  """
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples={num_samples!r}; must be an int >= 1")
  check_inputs(config, prompt_tokens_UxP, prompt_valid_UxP, sampling)
  check_interrupt(sampling)
  B = len(prompt_tokens_UxP) * num_samples
  if keys_B is not None:
    if not is_row_keys(keys_B) or keys_B.shape[0] != B:
      raise ValueError(f"keys_B has shape {keys_B.shape}; need one key per output row ({B})")
    key = keys_B
  if budget_B is not None:
    budget_B = np.asarray(budget_B)
    if budget_B.shape != (B,) or budget_B.min() < 1 or budget_B.max() > sampling.max_new_tokens:
      raise ValueError(f"budget_B must be [{B}] ints in [1, max_new_tokens={sampling.max_new_tokens}]; got shape "
                       f"{budget_B.shape}, range [{budget_B.min()}, {budget_B.max()}]")
    budget_B = jnp.asarray(budget_B, jnp.int32)
  return _generate_jit(config, sampling, params, jnp.asarray(prompt_tokens_UxP), jnp.asarray(prompt_valid_UxP), key,
                       num_samples, budget_B)
