"""Wordle over a built-in list of 100 five-letter words (round limit 8; `num_words` plays on its first n).

Instance idx of seed s hides `WORDS[random.Random(f"wordle|s|idx").randrange(100)]`. Feedback per letter:
G right place, Y in the word elsewhere, - absent (standard duplicate-letter rules). A guess outside the list
is an ordinary step that says so.
"""
from __future__ import annotations

import collections
import random

from exrl.envs.protocol import StepResult, TextEnv

WORDS = tuple("""
about above actor acute admit adopt after again agent agree alarm album alert alike alive allow alone along
alter among anger angle angry apart apple apply arena argue arise array aside audio audit avoid award aware
badly baker basic beach began begin being below bench birth black blade blame blind block blood board boost
bound brain brand bread break brick brief bring broad brown build built buyer cable chain chair chart chase
cheap check chest chief child civil claim class clean clear climb clock close cloud coach coast count court
cover craft crane cream crime cross crowd crown curve cycle
""".split())

assert len(WORDS) == 100 and len(set(WORDS)) == 100 and all(len(w) == 5 for w in WORDS)


def feedback(guess: str, target: str) -> str:
  """Per-letter marks: G (right place), Y (elsewhere, counting each target letter once), - (absent)."""
  marks = ["-"] * 5
  left = collections.Counter(t for g, t in zip(guess, target) if g != t)
  for i, (g, t) in enumerate(zip(guess, target)):
    if g == t:
      marks[i] = "G"
    elif left[g] > 0:
      marks[i] = "Y"
      left[g] -= 1
  return "".join(marks)


class WordleEnv(TextEnv):
  name = "wordle"
  max_turns = 8

  def __init__(self, seed: int = 0, num_words: int = len(WORDS)):
    super().__init__(seed)
    if not 1 <= num_words <= len(WORDS):
      raise ValueError(f"wordle num_words={num_words}; must be in [1, {len(WORDS)}]")
    self.words = WORDS[:num_words]  # an easier game: targets and legal guesses are the first num_words words

  def _reset(self, idx: int) -> str:
    self.target = self.words[random.Random(f"wordle|{self.seed}|{idx}").randrange(len(self.words))]
    self.history: list[tuple[str, str]] = []
    return "Wordle task: guess the secret five-letter word. Feedback: G right place, Y wrong place, - absent."

  def available_actions(self) -> list[str]:
    return list(self.words)

  def _step(self, action: str) -> StepResult:
    guess = action.lower()
    if guess not in self.words:
      return StepResult("Not in the word list. Guess a five-letter word.", 0.0, False)
    marks = feedback(guess, self.target)
    self.history.append((guess, marks))
    if guess == self.target:
      return StepResult(f"{guess} {marks}. Solved.", 1.0, True)
    return StepResult(f"{guess} {marks}.", 0.0, False)

  def expert_action(self) -> tuple[str, str]:
    """The first word in list order consistent with every feedback so far."""
    fits = [w for w in self.words if all(feedback(g, w) == m for g, m in self.history)]
    return f"{len(fits)} words fit, try {fits[0]}.", fits[0]
