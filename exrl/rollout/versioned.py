"""In-flight weight switches (PipelineRL, arXiv 2509.19128): decode on the continuous engine's slots a few steps at
a time, asking for the newest params between blocks of steps, and tag every token with the policy version that
sampled it.

A switch takes effect at the next decode step the engine checks (every `every` steps: each check is a host round
trip, and one per token made in-flight sampling ~4x slower than a static batch). The KV cache of earlier tokens is
kept (computed by older versions), as PipelineRL does. The first token after a switch is drawn from the new head
applied to the hidden state the previous step computed with the old weights; every later token's forward uses the
new weights throughout. A row may thus carry tokens of several versions; the trainer's lag is taken from its oldest
token.

Every request's samples must fit the slots at once (no refill): this is the engine of a rollout worker's batch, not a
server. Tokens are identical to `continuous.run`'s for the same keys while the params do not change.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from exrl.models.config import ModelConfig
from exrl.rollout import continuous, sampler
from exrl.rollout.sampler import SamplingConfig


class Feed:
  """A `params_fn` for `generate` fed by a rollout worker: decode step 0 uses `first` = (version, params), every later
  check the newest published version (`latest() -> (version, params)`), so new weights take effect between steps.
  every: decode steps between checks (`generate`'s `every`)."""

  def __init__(self, first: tuple[int, dict], latest: Callable[[], tuple[int, dict]], every: int = 1):
    if every < 1:
      raise ValueError(f"Feed every={every}: decode steps between weight checks must be >= 1")
    self.first, self.latest, self.every = first, latest, every
    self.switches, self._last = 0, first[0]  # switches: version changes seen during the generation

  def __call__(self, decode_step: int) -> tuple[int, dict]:
    got = self.first if decode_step == 0 else self.latest()
    if decode_step and got[0] != self._last:
      self.switches += 1
    self._last = got[0]
    return got


def generate(config: ModelConfig, params_fn: Callable[[int], tuple[int, dict]], prompts: Sequence[Sequence[int]],
             sampling: SamplingConfig, *, num_samples: int, prompt_len: int, key: jax.Array, every: int = 1) -> dict:
  """Sample num_samples completions per prompt; params_fn(decode_step) -> (version, params) is called before
  decode steps 0, every, 2 * every, ... (step 0 also prefills), and the steps in between run in one jitted call with
  those params. Request u's key is fold_in(key, u), as in `continuous.run`.

  Returns numpy rows [U * num_samples, N]: tokens, mask (loss tokens), gen (generated, injected included), logp,
  self_certainty, entropy, version (-1 where no token), and the rows' min_version [U * num_samples].
  """
  sampler.check_interrupt(sampling)
  if every < 1:
    raise ValueError(f"every={every}: decode steps between weight checks must be >= 1")
  S, P, N = len(prompts) * num_samples, prompt_len, sampling.max_new_tokens
  pad = sampling.pad_id if sampling.pad_id is not None else (config.pad_token_id or 0)
  end = (sampling.think_budget + len(sampling.interrupt_token_ids) + sampling.answer_budget
         if sampling.think_budget else N)  # the row budget continuous.run gives with length interruption
  unstacked = {}  # version -> its per-layer params, unstacked once (the engine's decode wants them so)

  def params_at(decode_step):
    v, p = params_fn(decode_step)
    if v not in unstacked:
      unstacked.clear()
      unstacked[v] = continuous._unstack_jit(p)
    return v, unstacked[v]

  for u, prompt in enumerate(prompts):
    if not 0 < len(prompt) <= P:
      raise ValueError(f"prompt {u} has {len(prompt)} tokens; must be in [1, prompt_len={P}]")
  version, params = params_at(0)
  keys_SxK = np.asarray(jax.random.key_data(continuous.row_keys(
      [jax.random.fold_in(key, u) for u in range(len(prompts))], [num_samples] * len(prompts))))
  state = continuous.start_rows(config, params, continuous.init_state(config, sampling, S, P), prompts,
                                np.arange(S), np.repeat(np.arange(len(prompts)), num_samples), [min(end, N)] * S,
                                keys_SxK, pad)
  version_SxN = np.full((S, N), -1, np.int64)
  active_S, t_S = jax.device_get((state["active_S"], state["t_S"]))
  step = 0
  while active_S.any():
    if step:
      version, params = params_at(step)
    t0_S = t_S
    state = continuous._decode_jit(config, sampling, params, state, S + 1, every)
    active_S, t_S = jax.device_get((state["active_S"], state["t_S"]))
    drawn_SxN = (np.arange(N)[None] >= t0_S[:, None]) & (np.arange(N)[None] < t_S[:, None])
    version_SxN[drawn_SxN] = version  # the tokens each slot drew in these steps
    step += every
  host = jax.device_get({k: state[k] for k in ("tokens_SxN", "mask_SxN", "gen_SxN", "logp_SxN", "sc_SxN",
                                               "entropy_SxN")})
  keep_SxN = np.arange(N)[None] < t_S[:, None]
  version_SxN = np.where(keep_SxN, version_SxN, -1)
  min_version_S = np.where(keep_SxN, version_SxN, np.iinfo(np.int64).max).min(1)
  zero = lambda name: np.where(keep_SxN, host[name], 0.0)
  return {"tokens": np.where(keep_SxN, host["tokens_SxN"], pad), "mask": host["mask_SxN"] & keep_SxN,
          "gen": host["gen_SxN"] & keep_SxN, "logp": zero("logp_SxN"), "self_certainty": zero("sc_SxN"),
          "entropy": zero("entropy_SxN"), "version": version_SxN, "min_version": min_version_S}
