"""A grid maze: walk from the start to the goal with up / down / left / right (round limit 15).

Instance idx of seed s is a random solvable grid drawn from `random.Random(f"maze|s|idx")`. The observation
names the agent's cell, the goal's, and the open directions; bumping a wall is an ordinary step.
"""
from __future__ import annotations

import collections
import random

from exrl.envs.protocol import StepResult, TextEnv

MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}


class MazeEnv(TextEnv):
  name = "maze"
  max_turns = 15

  def __init__(self, seed: int = 0, size: int = 5, wall_frac: float = 0.3):
    super().__init__(seed)
    if size < 2 or not 0 <= wall_frac < 0.7:
      raise ValueError(f"maze size={size} must be >= 2 and wall_frac={wall_frac} in [0, 0.7)")
    self.size, self.wall_frac = size, wall_frac

  def _reset(self, idx: int) -> str:
    rng = random.Random(f"maze|{self.seed}|{idx}")
    n = self.size
    cells = [(r, c) for r in range(n) for c in range(n)]
    while True:
      self.walls = {x for x in cells if rng.random() < self.wall_frac}
      free = [x for x in cells if x not in self.walls]
      if len(free) < 2:
        continue
      self.pos, self.goal = rng.sample(free, 2)
      dist = self._distances().get(self.pos)
      if dist is not None and 2 <= dist <= self.max_turns - 3:
        break
    grid = "\n".join("".join("#" if (r, c) in self.walls else "S" if (r, c) == self.pos else
                             "G" if (r, c) == self.goal else "." for c in range(n)) for r in range(n))
    return f"Maze task: walk from S to G. # is a wall.\n{grid}\n{self._where()}"

  def _open(self) -> list[str]:
    return [a for a, d in MOVES.items() if self._free(self.pos[0] + d[0], self.pos[1] + d[1])]

  def _free(self, r: int, c: int) -> bool:
    return 0 <= r < self.size and 0 <= c < self.size and (r, c) not in self.walls

  def _where(self) -> str:
    return f"At {self.pos[0]},{self.pos[1]}; goal {self.goal[0]},{self.goal[1]}; open: {' '.join(self._open())}."

  def _distances(self) -> dict:
    """BFS distance to the goal from every reachable cell."""
    dist, queue = {self.goal: 0}, collections.deque([self.goal])
    while queue:
      r, c = queue.popleft()
      for dr, dc in MOVES.values():
        nxt = (r + dr, c + dc)
        if self._free(*nxt) and nxt not in dist:
          dist[nxt] = dist[(r, c)] + 1
          queue.append(nxt)
    return dist

  def available_actions(self) -> list[str]:
    return list(MOVES)

  def _step(self, action: str) -> StepResult:
    if action not in MOVES:
      return StepResult(f"Invalid action. Use up, down, left or right. {self._where()}", 0.0, False)
    dr, dc = MOVES[action]
    nxt = (self.pos[0] + dr, self.pos[1] + dc)
    if not self._free(*nxt):
      return StepResult(f"Blocked {action}. {self._where()}", 0.0, False)
    self.pos = nxt
    if self.pos == self.goal:
      return StepResult("You reach the goal.", 1.0, True)
    return StepResult(f"Moved {action}. {self._where()}", 0.0, False)

  def expert_action(self) -> tuple[str, str]:
    """A shortest-path move (BFS), ties broken alphabetically."""
    dist = self._distances()
    best = min((dist.get((self.pos[0] + d[0], self.pos[1] + d[1]), 10 ** 9), a) for a, d in MOVES.items()
               if self._free(self.pos[0] + d[0], self.pos[1] + d[1]))
    return f"{best[0]} steps left, go {best[1]}.", best[1]
