"""Crafting in the style of TextCraft: gather base items and craft up a recipe tree (round limit 20).

Instance idx of seed s draws a recipe tree from `random.Random(f"textcraft|s|idx")`: the goal item, its
recipes (each needs 1 to 3 distinct ingredients, all consumed) down to base items that `get` gives. The
instruction lists the recipes shuffled; the expert plan (one get per base, one craft per recipe) fits in 20.
Actions: `get ITEM`, `craft ITEM`, `inventory`.
"""
from __future__ import annotations

import random

from exrl.envs.protocol import StepResult, TextEnv

ITEMS = tuple("""
log plank stick stone coal ore ingot sand glass reed paper wool cloth string bow arrow torch lamp wheel cart
rope hook net clay brick bowl cup seed bread dye ink book map gem ring nail axe saw chest door
""".split())


class TextCraftEnv(TextEnv):
  name = "textcraft"
  max_turns = 20

  def __init__(self, seed: int = 0, max_depth: int = 3):
    super().__init__(seed)
    if max_depth < 1:
      raise ValueError(f"textcraft max_depth={max_depth}; must be >= 1")
    self.max_depth = max_depth

  def _reset(self, idx: int) -> str:
    rng = random.Random(f"textcraft|{self.seed}|{idx}")
    while True:
      names = list(ITEMS)
      rng.shuffle(names)
      self.recipes: dict[str, tuple[str, ...]] = {}
      self.bases: set[str] = set()
      self.goal = self._grow(names, rng, depth=0)
      if self.goal in self.recipes and len(self.recipes) + len(self.bases) <= self.max_turns - 4:
        break
    self.inventory: list[str] = []
    lines = [f"{item} = {' + '.join(ing)}" for item, ing in self.recipes.items()]
    rng.shuffle(lines)
    return f"Craft task: make {self.goal}. Recipes: {'; '.join(lines)}."

  def _grow(self, names: list[str], rng: random.Random, depth: int) -> str:
    item = names.pop()
    if depth == self.max_depth or (depth > 0 and rng.random() < 0.4):
      self.bases.add(item)
    else:
      self.recipes[item] = tuple(self._grow(names, rng, depth + 1) for _ in range(rng.randint(1, 3)))
    return item

  def available_actions(self) -> list[str]:
    return ([f"get {b}" for b in sorted(self.bases)] + [f"craft {r}" for r in sorted(self.recipes)] +
            ["inventory"])

  def _inv(self) -> str:
    return "Inventory: " + (", ".join(sorted(self.inventory)) or "empty") + "."

  def _step(self, action: str) -> StepResult:
    verb, _, item = action.partition(" ")
    if action == "inventory":
      return StepResult(self._inv(), 0.0, False)
    if verb == "get" and item in self.bases:
      self.inventory.append(item)
      return StepResult(f"Got {item}. {self._inv()}", 0.0, False)
    if verb == "get":
      return StepResult(f"Cannot get {item}. {self._inv()}", 0.0, False)
    if verb == "craft" and item in self.recipes:
      missing = [x for x in self.recipes[item] if x not in self.inventory]
      if missing:
        return StepResult(f"Cannot craft {item}: missing {', '.join(missing)}. {self._inv()}", 0.0, False)
      for x in self.recipes[item]:
        self.inventory.remove(x)
      self.inventory.append(item)
      if item == self.goal:
        return StepResult(f"Crafted {item}. Goal done.", 1.0, True)
      return StepResult(f"Crafted {item}. {self._inv()}", 0.0, False)
    if verb == "craft":
      return StepResult(f"No recipe for {item}. {self._inv()}", 0.0, False)
    return StepResult(f"Invalid action. Use get ITEM, craft ITEM or inventory. {self._inv()}", 0.0, False)

  def expert_action(self) -> tuple[str, str]:
    """Depth-first: the first missing ingredient of the goal's tree, crafting as soon as one is complete."""
    item = self.goal
    while True:
      if item in self.bases:
        return f"I need {item}.", f"get {item}"
      missing = [x for x in self.recipes[item] if x not in self.inventory]
      if not missing:
        return f"I have all for {item}.", f"craft {item}"
      item = missing[0]
