"""Scripted-expert trajectories for behaviour cloning, as plain records (no tokens).

A trajectory: the instruction (the reset observation), then turns of (thought, action, observation), the
final reward and whether the episode ended within the env's round limit.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class EnvTrajectory:
  env: str
  idx: int
  instruction: str
  turns: list[tuple[str, str, str]]  # (thought, action, observation)
  reward: float
  done: bool


def run_expert(env, idx: int) -> EnvTrajectory:
  """Run `env.expert_action()` from `env.reset(idx)` for at most `env.max_turns` turns."""
  instruction = env.reset(idx)
  turns, reward, done = [], 0.0, False
  for _ in range(env.max_turns):
    thought, action = env.expert_action()
    obs, reward, done = env.step(action)
    turns.append((thought, action, obs))
    if done:
      break
  return EnvTrajectory(env.name, idx, instruction, turns, float(reward), bool(done))


def expert_trajectories(env, indices) -> list[EnvTrajectory]:
  return [run_expert(env, int(i)) for i in indices]
