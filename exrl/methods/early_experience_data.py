"""Early Experience examples (arXiv 2510.08558) as (ids, loss_mask) pairs for `train_sft(tokenized=...)`.

Every example starts with the expert state s_i tokenised exactly as a rollout builds it (`state_ids`), loss 0:
  IWM: s_i | alternative turn (as sampled) [eos] | "\nObservation: s'\n"     loss 1 on the observation only
  SR:  s_i | "Thought: <rationale>\nAction: <expert action>" [eos]          loss 1 on the whole turn + eos
(one SR example per alternative: its rationale says why the expert's action beats that alternative)
The SR rationale is a template over the observed outcomes (`reflection_thought`), documented as such.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from exrl.envs.experts import EnvTrajectory
from exrl.rollout.multiturn import agent_text, observation_text, trajectory_ids

_SENTENCE = re.compile(r".*?[.!?](?=\s|$)", re.S)


@dataclasses.dataclass(frozen=True)
class Branch:
  """One (s, a', s') record: at expert state `turn` of (env, idx), the policy's turn `text` with parsed
  `action` led to `observation` with `reward` / `done`."""
  env: str
  idx: int
  turn: int
  text: str
  action: str
  observation: str
  reward: float
  done: bool


def state_ids(tokenizer, traj: EnvTrajectory, turn: int) -> list[int]:
  """Ids of the history before the expert's turn `turn`: [bos] instruction, then turns [0, turn) each with
  its observation, so the agent speaks next (the tokens a rollout would hold at that point)."""
  prefix = [(agent_text(t, a), o) for t, a, o in traj.turns[:turn]]
  ids, _ = trajectory_ids(tokenizer, traj.instruction, prefix)
  if turn:  # trajectory_ids leaves out the last turn's observation
    ids = ids + tokenizer.encode(observation_text(traj.turns[turn - 1][2]))
  return ids


def _by_key(trajs: Sequence[EnvTrajectory]) -> dict:
  out = {(t.env, t.idx): t for t in trajs}
  if len(out) != len(trajs):
    raise ValueError("expert trajectories repeat an (env, instance) pair; branches could not name their state")
  return out


def iwm_examples(tokenizer, trajs: Sequence[EnvTrajectory], branches: Sequence[Branch]) -> list[tuple[list, list]]:
  """One next-observation example per branch: loss only on the observation the env answered."""
  by_key, out = _by_key(trajs), []
  for b in branches:
    ids = state_ids(tokenizer, by_key[(b.env, b.idx)], b.turn) + tokenizer.encode(b.text) + [tokenizer.eos_id]
    obs = tokenizer.encode(observation_text(b.observation))
    out.append((ids + obs, [0] * len(ids) + [1] * len(obs)))
  return out


def first_sentence(observation: str) -> str:
  m = _SENTENCE.match(observation)
  return m.group(0) if m else observation


def reflection_thought(expert_thought: str, alternative: Branch) -> str:
  """The TEMPLATE rationale: the tried alternative with the first sentence of what the env answered, then the
  expert's own reason, e.g. "If left: Blocked left. 3 steps left, go up."."""
  return f"If {alternative.action}: {first_sentence(alternative.observation)} {expert_thought}"


def sr_examples(tokenizer, trajs: Sequence[EnvTrajectory], branches: Sequence[Branch],
                threshold: float) -> list[tuple[list, list]]:
  """One reflection example per alternative that did not solve the task (reward <= threshold: an alternative
  that also solves it is no reason to prefer the expert's action), as the paper pairs one rationale with each
  alternative; loss on the rationale, the expert action and eos."""
  by_key, out = _by_key(trajs), []
  for b in branches:
    if b.reward > threshold:
      continue
    traj = by_key[(b.env, b.idx)]
    thought, action, _ = traj.turns[b.turn]
    ids = state_ids(tokenizer, traj, b.turn)
    turn_ids = tokenizer.encode(agent_text(reflection_thought(thought, b), action)) + [tokenizer.eos_id]
    out.append((ids + turn_ids, [0] * len(ids) + [1] * len(turn_ids)))
  return out
