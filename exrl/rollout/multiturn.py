"""ReAct multi-turn rollouts over text environments, batched, with an agent-token loss mask.

A trajectory is one token sequence:
  [bos] instruction "\n" | "Thought: ...\nAction: ..." [eos] | "\nObservation: ...\n" | agent [eos] | ...
Each part is tokenised on its own and concatenated (never re-tokenised as a whole), so the ids the sampler
produced are the ids trained on. `agent_mask` is 1 exactly on the agent's tokens (its turn text and the eos
that ends the turn); the instruction and observations are 0. No observation follows the last turn.

Envs are anything with the `exrl.envs.protocol.Env` methods (in-process or `EnvClient` over HTTP): the
rollout only calls `reset`, `step` and reads `max_turns`, so both backends give identical trajectories.
Shape suffixes: B envs in the batch, P padded history length, N tokens per agent turn.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import numpy as np

from exrl.models.config import ModelConfig
from exrl.rollout.sampler import SamplingConfig, pad_prompts, sample

_ACTION = re.compile(r"Action:[ \t]*([^\n]*)")


def instruction_text(observation: str) -> str:
  return f"{observation}\n"


def agent_text(thought: str, action: str) -> str:
  return f"Thought: {thought}\nAction: {action}"


def observation_text(observation: str) -> str:
  return f"\nObservation: {observation}\n"


def parse_action(text: str) -> str:
  """The first `Action: ...` line's argument, stripped; "" when the turn has none (the env then says so)."""
  m = _ACTION.search(text)
  return m.group(1).strip() if m else ""


def _decode(tokenizer, ids) -> str:
  n = tokenizer.vocab_size  # a padded model vocab can sample ids the tokenizer lacks
  return tokenizer.decode([int(i) for i in ids if 0 <= int(i) < n])


SUCCESS_THRESHOLD = 0.99  # an episode whose final reward exceeds this is solved (the envs' rewards are 0 or 1)


@dataclasses.dataclass(frozen=True)
class MultiTurnConfig:
  """max_new_tokens per agent turn; max_turns 0 means each env's own round limit; max_len caps the whole
  trajectory in tokens (an env whose next turn would not fit stops, unsolved)."""
  max_new_tokens: int = 32
  temperature: float = 1.0
  greedy: bool = False
  max_turns: int = 0
  max_len: int = 512


@dataclasses.dataclass
class Trajectory:
  """tokens int ids; agent_mask 1 on agent tokens; logp: sampling log-prob (temperature 1) of each agent
  token, 0 elsewhere; turns: (agent text, action, observation) per turn."""
  env: str
  idx: int
  tokens: list[int]
  agent_mask: list[int]
  logp: list[float]
  turns: list[tuple[str, str, str]]
  reward: float
  done: bool

  @property
  def text(self) -> str:
    return "".join(agent_text_ + observation_text(obs) for agent_text_, _, obs in self.turns)


def trajectory_ids(tokenizer, instruction: str, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[int]]:
  """(ids, agent_mask) of a trajectory given as the instruction and (agent text, observation) turns,
  tokenised exactly as `rollout` builds it (behaviour-cloning data)."""
  ids = tokenizer.encode(instruction_text(instruction), add_bos=True)
  mask = [0] * len(ids)
  for t, (agent, obs) in enumerate(turns):
    a = tokenizer.encode(agent) + [tokenizer.eos_id]
    ids, mask = ids + a, mask + [1] * len(a)
    if t + 1 < len(turns):
      o = tokenizer.encode(observation_text(obs))
      ids, mask = ids + o, mask + [0] * len(o)
  return ids, mask


def rollout(model_config: ModelConfig, params, tokenizer, envs: Sequence, indices: Sequence[int], key: jax.Array,
            cfg: MultiTurnConfig = MultiTurnConfig()) -> list[Trajectory]:
  """Run envs[b] from instance indices[b] until done or its turn limit; one batched sample per turn.

  The batch shape stays B for every turn (finished envs get a 1-token dummy prompt), and histories are
  padded to a power of two, so a rollout compiles the sampler a few times, not once per turn.
  """
  if len(envs) != len(indices) or not envs:
    raise ValueError(f"rollout got {len(envs)} envs and {len(indices)} indices; need the same number, >= 1")
  sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, greedy=cfg.greedy,
                            stop_token_ids=tuple(tokenizer.stop_ids), pad_id=tokenizer.pad_id)
  B = len(envs)
  trajs = []
  for env, idx in zip(envs, indices):
    ids = tokenizer.encode(instruction_text(env.reset(int(idx))), add_bos=True)
    trajs.append(Trajectory(getattr(env, "name", "env"), int(idx), ids, [0] * len(ids), [0.0] * len(ids), [], 0.0,
                            False))
  limits = [cfg.max_turns or env.max_turns for env in envs]
  active = [True] * B
  dummy = [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id]
  for turn in range(max(limits)):
    for b in range(B):
      if active[b] and len(trajs[b].tokens) + cfg.max_new_tokens > cfg.max_len:
        active[b] = False  # out of context: ends unsolved
    if not any(active):
      break
    tokens, valid = pad_prompts([trajs[b].tokens if active[b] else dummy for b in range(B)], tokenizer.pad_id,
                                bucket="pow2")
    out = sample(model_config, params, tokens, valid, jax.random.fold_in(key, turn), sampling)
    toks_BxN, mask_BxN, logp_BxN = jax.device_get((out.tokens_BxN, out.mask_BxN, out.logp_BxN))
    for b in range(B):
      if not active[b]:
        continue
      tr = trajs[b]
      new = toks_BxN[b][mask_BxN[b]].tolist()
      text = _decode(tokenizer, new)
      action = parse_action(text)
      obs, reward, done = envs[b].step(action)
      tr.tokens += new
      tr.agent_mask += [1] * len(new)
      tr.logp += logp_BxN[b][mask_BxN[b]].tolist()
      tr.turns.append((text, action, obs))
      tr.reward, tr.done = float(reward), bool(done)
      if done or turn + 1 >= limits[b]:
        active[b] = False
      else:
        o = tokenizer.encode(observation_text(obs))
        tr.tokens += o
        tr.agent_mask += [0] * len(o)
        tr.logp += [0.0] * len(o)
  return trajs


def success_rate(trajs: Sequence[Trajectory], threshold: float = SUCCESS_THRESHOLD) -> float:
  return float(np.mean([t.reward > threshold for t in trajs])) if trajs else 0.0
