"""The environment protocol every text environment follows, in-process or over HTTP.

  env.reset(idx) -> observation          # instance idx of this env's seed; deterministic
  env.step(action) -> StepResult         # (observation, reward, done); an illegal action is an ordinary step
  env.observation() -> str               # the latest observation again
  env.available_actions() -> list[str]   # actions legal now (a list for prompts and experts, not a limit)

`max_turns` is the paper's round limit. Built-in envs also expose `expert_action() -> (thought, action)`,
the scripted expert's next move from the current state (behaviour-cloning data).
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

MAX_ACTION_CHARS = 256  # longer actions are malformed (the server answers 413)


class StepResult(NamedTuple):
  observation: str
  reward: float
  done: bool


class Env(Protocol):
  name: str
  max_turns: int

  def reset(self, idx: int) -> str: ...
  def step(self, action: str) -> StepResult: ...
  def observation(self) -> str: ...
  def available_actions(self) -> list[str]: ...


class TextEnv:
  """Shared bookkeeping: the latest observation, done flag, and the not-reset / already-done guards."""
  name = "text"
  max_turns = 10

  def __init__(self, seed: int = 0):
    self.seed = seed
    self._obs, self._done, self._started = "", False, False

  def reset(self, idx: int) -> str:
    if not isinstance(idx, int) or idx < 0:
      raise ValueError(f"{self.name}: data_idx={idx!r}; must be an int >= 0")
    self._started, self._done = True, False
    self._obs = self._reset(idx)
    return self._obs

  def step(self, action: str) -> StepResult:
    if not self._started:
      raise RuntimeError(f"{self.name}: step before reset; call reset(idx) first")
    if self._done:
      return StepResult("The episode is over. Reset to start a new one.", 0.0, True)
    res = self._step(action.strip())
    self._obs, self._done = res.observation, res.done
    return res

  def observation(self) -> str:
    return self._obs

  def _reset(self, idx: int) -> str:
    raise NotImplementedError  # each env defines it

  def _step(self, action: str) -> StepResult:
    raise NotImplementedError  # each env defines it
