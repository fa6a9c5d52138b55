"""Reward functions, pure, and the registry of the RL loop's rewards (`REWARDS`: name -> function + its inputs).

Verifier rewards run untrusted model output through time-bounded worker processes, so they live with
the tasks: `exrl.tasks.pool.verifier_rewards`.

Self-certainty (Intuitor, arXiv 2505.19590) is the masked token-mean of the per-token `kernels.token_stats(...)
.self_certainty` over response tokens. Which model produced those per-token values (the online policy that sampled the
rollout, or a frozen annotator for the offline ablation) is the caller's switch; this function only reduces them.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def format_rewards(responses: Sequence[str], pattern: str | re.Pattern | None = None,
                   marker: str = "answer:") -> np.ndarray:
  """Format reward float32[B]: 1.0 for a well-formed response, else 0.0.

  With `pattern` (e.g. `task.format_regex`), well formed means the stripped response fully matches it. Without, it means
  `marker` occurs exactly once (case-insensitive) and is followed by exactly one integer and nothing else.
  Responses longer than 100k characters score 0 without being matched (bounds regex time on untrusted output).
  """
  from exrl.tasks.base import extract_marked_int  # Pure python, no device code.

  rx = re.compile(pattern) if isinstance(pattern, str) else pattern
  out = np.zeros(len(responses), np.float32)
  for i, r in enumerate(responses):
    if not isinstance(r, str) or len(r) > 100_000:
      continue
    if rx is not None:
      out[i] = rx.fullmatch(r.strip()) is not None
    else:
      out[i] = r.lower().count(marker.lower()) == 1 and extract_marked_int(r, marker) is not None
  return out


@jax.jit
def self_certainty_reward(self_certainty_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Intuitor reward float32[B]: mean of per-token self-certainty over response tokens (mask > 0).

  self_certainty_BxT: per-token KL(U || p) in nats, `logsumexp(z) - mean(z) - log V`, from
    `kernels.token_stats(...).self_certainty` on the sampling temperature's logits z / T (the collectors pass
    T; verl-intuitor's actor computes it on the same temperature-scaled logits).
  mask_BxT: 1 on response tokens, 0 on prompt and padding (bool or number).
  Rows with an empty mask get 0. Values under the mask are never read, so NaN in padding is harmless. The reward is
  detached: no gradient flows through it.
  """
  m = mask_BxT.astype(bool)
  sc = jnp.where(m, jax.lax.stop_gradient(self_certainty_BxT).astype(jnp.float32), 0.0)
  n_B = m.sum(axis=-1).astype(jnp.float32)
  return jnp.where(n_B > 0, sc.sum(axis=-1) / jnp.maximum(n_B, 1.0), 0.0)


# ----------------------------------------------------------------------------- label-free rewards and controls


def entropy_rewards(entropy_BxT, mask_BxT) -> np.ndarray:
  """Token-entropy minimisation (RENT / EM-RL): reward float32[B] = -(mean entropy over the row's masked tokens).

  entropy_BxT: per-token entropy in nats of the distribution each response token was drawn from. Rows with an
  empty mask get 0.
  """
  h = np.asarray(entropy_BxT, np.float64)
  m = np.asarray(mask_BxT) > 0
  n_B = m.sum(-1)
  return np.where(n_B > 0, -np.where(m, h, 0.0).sum(-1) / np.maximum(n_B, 1), 0.0).astype(np.float32)


def majority_vote_rewards(answers: Sequence[str | None], group_size: int) -> np.ndarray:
  """TTRL: reward float32[B] = 1 where a sample's extracted answer equals its group's most common one, else 0.

  answers: one extracted final answer per sample (None when none could be extracted; never a majority, never
  rewarded); groups are contiguous runs of `group_size`. Ties go to the answer seen first in the group.
  """
  if len(answers) % group_size:
    raise ValueError(f"{len(answers)} answers do not split into groups of group_size={group_size}")
  out = np.zeros(len(answers), np.float32)
  for g in range(0, len(answers), group_size):
    group = answers[g:g + group_size]
    counts: dict[str, int] = {}
    for a in group:
      if a is not None:
        counts[a] = counts.get(a, 0) + 1
    if not counts:
      continue
    top = max(counts.values())
    majority = next(a for a in group if a is not None and counts[a] == top)
    out[g:g + group_size] = [float(a == majority) for a in group]
  return out


def noise_rewards(key: jax.Array, batch: int) -> np.ndarray:
  """Control: i.i.d. N(0, 1) rewards float32[B] (deterministic in `key`, so a resumed run draws the same)."""
  return np.asarray(jax.random.normal(key, (batch,), jnp.float32))


def shuffle_within_groups(x_B, group_size: int, key: jax.Array) -> np.ndarray:
  """Control: `x_B` with each contiguous group's values randomly permuted (same values, no link to samples)."""
  x = np.asarray(x_B)
  if x.shape[0] % group_size:
    raise ValueError(f"{x.shape[0]} values do not split into groups of group_size={group_size}")
  G = x.shape[0] // group_size
  perm_GxK = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, group_size))(jax.random.split(key, G)))
  return np.take_along_axis(x.reshape(G, group_size), perm_GxK, axis=1).reshape(-1)


# ----------------------------------------------------------------------------- the registry


# What a reward may read; a collector declares which of these it can provide.
OUTCOME = "outcome"  # the task verifier's score, or an environment's final reward (labels)
SELF_CERTAINTY = "self_certainty"  # per-trace mean token self-certainty (online policy or offline annotator)
TOKEN_ENTROPY = "token_entropy"  # per-token entropy and the response mask
ANSWERS = "answers"  # final answers extracted from the response texts
INPUTS = (OUTCOME, SELF_CERTAINTY, TOKEN_ENTROPY, ANSWERS)
_FIELD = {OUTCOME: "outcome_B", SELF_CERTAINTY: "self_certainty_B", TOKEN_ENTROPY: "entropy_BxN", ANSWERS: "answers"}


@dataclasses.dataclass(frozen=True)
class RewardInputs:
  """What a collector hands the registry for B traces (groups of `group_size` contiguous); unprovided: None.

  outcome_B: verifier / environment reward. self_certainty_B: nats. entropy_BxN / mask_BxN: per-token entropy of the
  distribution each response token was drawn from, and the response mask. answers: extracted answers (None: none).
  key: the step's PRNG key; controls draw from a stream folded off it, never the sampler's.
  """
  group_size: int
  key: object = None
  outcome_B: np.ndarray | None = None
  self_certainty_B: np.ndarray | None = None
  entropy_BxN: np.ndarray | None = None
  mask_BxN: np.ndarray | None = None
  answers: Sequence[str | None] | None = None


@dataclasses.dataclass(frozen=True)
class Reward:
  """columns(inputs) -> one float[B] column per reward signal (several are normalised per group, then mixed)."""
  columns: Callable[[RewardInputs], list]
  needs: tuple[str, ...]
  doc: str


def _control_key(x: RewardInputs):
  return jax.random.fold_in(x.key, 0x5EED)  # not the sampler's stream


REWARDS: dict[str, Reward] = {
    "verifier": Reward(lambda x: [x.outcome_B], (OUTCOME,), "the task's verifier, or the environment's reward"),
    "self_certainty": Reward(lambda x: [x.self_certainty_B], (SELF_CERTAINTY,),
                             "Intuitor: the model's own confidence, KL(U || p), no labels"),
    "mix": Reward(lambda x: [x.outcome_B, x.self_certainty_B], (OUTCOME, SELF_CERTAINTY),
                  "verifier and self-certainty, each group-normalised, mixed by RLConfig.mix_weights"),
    "entropy": Reward(lambda x: [entropy_rewards(x.entropy_BxN, x.mask_BxN)], (TOKEN_ENTROPY,),
                      "RENT: minus the mean token entropy, no labels"),
    "majority": Reward(lambda x: [majority_vote_rewards(x.answers, x.group_size)], (ANSWERS,),
                       "TTRL: agreement with the group's majority answer, no labels"),
    "noise": Reward(lambda x: [noise_rewards(_control_key(x), len_of(x))], (),
                    "control: i.i.d. N(0, 1)"),
    "shuffled": Reward(lambda x: [shuffle_within_groups(x.self_certainty_B, x.group_size, _control_key(x))],
                       (SELF_CERTAINTY,), "control: self-certainty permuted within each group"),
}


def len_of(x: RewardInputs) -> int:
  """The number of traces B, from whichever input is there."""
  for v in (x.outcome_B, x.self_certainty_B, x.mask_BxN, x.answers):
    if v is not None:
      return len(v)
  raise ValueError("RewardInputs holds no per-trace input to count traces from")


def reward_columns(name: str, inputs: RewardInputs) -> np.ndarray:
  """float32[B, R]: the registered reward's column(s)."""
  if name not in REWARDS:
    raise ValueError(f"reward={name!r}; valid: {tuple(REWARDS)}")
  missing = [n for n in REWARDS[name].needs if getattr(inputs, _FIELD[n]) is None]
  if missing:
    raise ValueError(f"reward={name!r} needs {missing}, which this collector did not provide")
  return np.stack([np.asarray(c, np.float32) for c in REWARDS[name].columns(inputs)], axis=1)
