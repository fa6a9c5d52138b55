"""Text environments for multi-turn agents (AgentGym-style), served in-process or over HTTP.

`make_env(name, seed)` builds a built-in env; `ENVS` names them. See `protocol.py` for the contract,
`server.py` / `client.py` for the HTTP backend, and `experts.py` for behaviour-cloning data.
"""
from __future__ import annotations

from exrl.envs.maze import MazeEnv
from exrl.envs.protocol import Env, StepResult, TextEnv
from exrl.envs.textcraft import TextCraftEnv
from exrl.envs.wordle import WordleEnv

ENVS = {"maze": MazeEnv, "wordle": WordleEnv, "textcraft": TextCraftEnv}


def make_env(name: str, seed: int = 0, **kwargs) -> TextEnv:
  if name not in ENVS:
    raise ValueError(f"unknown env {name!r}; built-in envs are {sorted(ENVS)}")
  return ENVS[name](seed=seed, **kwargs)


__all__ = ["ENVS", "Env", "StepResult", "TextEnv", "make_env", "MazeEnv", "WordleEnv", "TextCraftEnv"]
