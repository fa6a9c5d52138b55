"""One entry point for single-completion rollouts: `generate` runs the static sampler or the continuous engine, as
`SamplingConfig.engine` says, and returns the same `SampleOutput` either way."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.rollout import continuous, sampler, versioned
from exrl.rollout.sampler import SampleOutput, SamplingConfig


def generate(config: ModelConfig, params: dict, prompt_tokens_UxP, prompt_valid_UxP, key: jax.Array,
             sampling: SamplingConfig, num_samples: int = 1) -> SampleOutput:
  """`num_samples` completions of each left-padded prompt, rows of a prompt adjacent (as `sampler.sample`).

  engine="static": `sampler.sample(..., key, ...)`, unchanged. engine="continuous": `continuous.run` on
  min(sampling.slots or rows, rows) slots with request u keyed fold_in(key, u) (so sample g of prompt u equals
  `sampler.sample(..., keys_B=continuous.row_keys(...))`, not the static engine's shared-key draw); its outputs are
  host-built arrays of the same shapes. The continuous engine runs in one process (raises under multi-process JAX).
  """
  if sampling.engine == "static":
    return sampler.sample(config, params, prompt_tokens_UxP, prompt_valid_UxP, key, sampling, num_samples)
  if jax.process_count() > 1:
    raise ValueError("sampling.engine='continuous' runs in one process; use engine='static' under multi-process JAX")
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples={num_samples!r}; must be an int >= 1")
  sampler.check_inputs(config, prompt_tokens_UxP, prompt_valid_UxP, sampling)
  tokens_UxP, valid_UxP = np.asarray(prompt_tokens_UxP, np.int32), np.asarray(prompt_valid_UxP, bool)
  U, P = tokens_UxP.shape
  keys_U = continuous.request_keys(key, U)
  requests = [continuous.Request(tokens_UxP[u][valid_UxP[u]].tolist(), num_samples, None, keys_U[u]) for u in range(U)]
  rows = U * num_samples
  res, _ = continuous.run(config, params, requests, sampling, slots=min(sampling.slots or rows, rows), prompt_len=P)
  rows = [r for per_request in res for r in per_request]
  return _output(tokens_UxP, valid_UxP, num_samples, lambda name: np.stack([getattr(r, name) for r in rows]))


def generate_versioned(config: ModelConfig, params_fn, prompt_tokens_UxP, prompt_valid_UxP, key: jax.Array,
                       sampling: SamplingConfig, num_samples: int = 1,
                       every: int = 1) -> tuple[SampleOutput, np.ndarray]:
  """As `generate` with engine="continuous", but with in-flight weight switches (`exrl.rollout.versioned`):
  params_fn(decode_step) -> (version, params) before decode steps 0, every, 2 * every, ... Returns (output,
  version_BxN: the policy version that sampled each token, -1 where none). Tokens equal engine="continuous"'s while
  the params stay the same.
  """
  if jax.process_count() > 1:
    raise ValueError("in-flight weight switches run in one process (the continuous engine's decode step)")
  sampler.check_inputs(config, prompt_tokens_UxP, prompt_valid_UxP, sampling)
  tokens_UxP, valid_UxP = np.asarray(prompt_tokens_UxP, np.int32), np.asarray(prompt_valid_UxP, bool)
  out = versioned.generate(config, params_fn, [t[v].tolist() for t, v in zip(tokens_UxP, valid_UxP)], sampling,
                           num_samples=num_samples, prompt_len=tokens_UxP.shape[1], key=key,
                           every=every)
  return _output(tokens_UxP, valid_UxP, num_samples, out.__getitem__), out["version"]


def _output(tokens_UxP: np.ndarray, valid_UxP: np.ndarray, num_samples: int, field) -> SampleOutput:
  """A `SampleOutput` from host rows [U * num_samples, N]: field(name) for tokens, mask, gen, logp, self_certainty
  and entropy."""
  gen_BxN = field("gen")
  prompt_tokens_BxP, prompt_valid_BxP = np.repeat(tokens_UxP, num_samples, 0), np.repeat(valid_UxP, num_samples, 0)
  seq_valid_BxS = jnp.asarray(np.concatenate([prompt_valid_BxP, gen_BxN], 1))
  return SampleOutput(
      tokens_BxN=jnp.asarray(field("tokens")), mask_BxN=jnp.asarray(field("mask")),
      logp_BxN=jnp.asarray(field("logp")), lengths_B=jnp.asarray(gen_BxN.sum(1, dtype=np.int32)),
      seq_tokens_BxS=jnp.asarray(np.concatenate([prompt_tokens_BxP, field("tokens")], 1)),
      seq_valid_BxS=seq_valid_BxS, seq_positions_BxS=decoder.default_positions(seq_valid_BxS),
      self_certainty_BxN=jnp.asarray(field("self_certainty")), entropy_BxN=jnp.asarray(field("entropy")))
