"""The ExIt task buffer: a capacity-N store of task instances (base task, iterate k, partial history),
each with a learnability score S, sampled with P_i ∝ exp(κ S_i).

  buf = TaskBuffer(capacity=512, kappa=10.0, seed=0)
  buf.record_group(parent_id=None, score=0.16, children=[(problem_dict, [["answer: 3*7+5", 1.0]])])
  entry = buf.sample()             # {"id", "problem", "history", "k", "score"}

Replacement is top-N: below capacity every insert is kept; at capacity a new instance goes in only if its
score is >= the current minimum, and replaces that minimum (ties: the oldest, i.e. lowest id, goes first).
A child inherits the score measured on its parent's group (`record_group`). Everything here is plain
JSON (problems are dicts, histories are [[text, quality], ...]), so `state_dict()` goes straight into the
checkpoint meta, and a buffer restored from it draws exactly what the original would have.
"""
from __future__ import annotations

import math
import random
from typing import Any, Sequence

from exrl.infra.rng import host_rng_state, set_host_rng_state


class TaskBuffer:
  """Prioritised top-N buffer of task instances. Not thread-safe: one owner (the source) drives it."""

  def __init__(self, capacity: int, kappa: float, seed: int = 0):
    if capacity < 1:
      raise ValueError(f"capacity={capacity} must be >= 1")
    if not math.isfinite(kappa) or kappa < 0:
      raise ValueError(f"kappa={kappa} must be finite and >= 0 (0 samples uniformly)")
    self.capacity, self.kappa = capacity, float(kappa)
    self.entries: list[dict[str, Any]] = []
    self.next_id = 0
    self.rng = random.Random(f"exit-buffer|{seed}")
    self.counts = {"inserted": 0, "rejected": 0, "replaced": 0}

  def __len__(self) -> int:
    return len(self.entries)

  def insert(self, problem: dict, history: Sequence[Sequence], score: float, k: int | None = None) -> int | None:
    """Insert one instance; returns its id, or None when the buffer is full and `score` < its minimum.

    history: [[text, quality], ...] oldest first; k: its iterate index (default len(history); larger when
    the owner dropped old turns).
    """
    score = float(score)
    if not math.isfinite(score):
      raise ValueError(f"score={score} must be finite (a group reward variance)")
    entry = {"id": self.next_id, "problem": dict(problem), "history": [[str(t), float(q)] for t, q in history],
             "k": len(history) if k is None else int(k), "score": score}
    if len(self.entries) < self.capacity:
      self.entries.append(entry)
    else:
      i_min = min(range(len(self.entries)), key=lambda i: (self.entries[i]["score"], self.entries[i]["id"]))
      if score < self.entries[i_min]["score"]:
        self.counts["rejected"] += 1
        return None
      self.entries[i_min] = entry
      self.counts["replaced"] += 1
    self.next_id += 1
    self.counts["inserted"] += 1
    return entry["id"]

  def record_group(self, parent_id: int | None, score: float, children: Sequence[tuple]) -> list[int | None]:
    """A group was run on instance `parent_id` (None: a base task) and its rewards had variance `score`.

    The parent, if still held, is re-scored to `score`; every child (problem, history[, k]) is inserted with
    the same score (inheritance). Returns the children's ids (None where rejected).
    """
    if parent_id is not None:
      for e in self.entries:
        if e["id"] == parent_id:
          e["score"] = float(score)
    return [self.insert(c[0], c[1], score, *c[2:]) for c in children]

  def probabilities(self) -> list[float]:
    """P_i = exp(κ S_i) / Σ_j exp(κ S_j), in entry order (max-shifted for stability)."""
    if not self.entries:
      return []
    z = [self.kappa * e["score"] for e in self.entries]
    m = max(z)
    w = [math.exp(x - m) for x in z]
    total = sum(w)
    return [x / total for x in w]

  def sample(self) -> dict:
    """One entry drawn with P ∝ exp(κ S) from the buffer's own RNG. Raises if the buffer is empty."""
    if not self.entries:
      raise ValueError("sample() on an empty TaskBuffer; check len(buffer) >= min_size first")
    return self.rng.choices(self.entries, weights=self.probabilities(), k=1)[0]

  def stats(self) -> dict[str, float]:
    scores = [e["score"] for e in self.entries]
    ks = [e["k"] for e in self.entries]
    return {"buffer_size": float(len(self.entries)),
            "buffer_score_mean": float(sum(scores) / len(scores)) if scores else 0.0,
            "buffer_score_min": float(min(scores)) if scores else 0.0,
            "buffer_k_mean": float(sum(ks) / len(ks)) if ks else 0.0}

  def state_dict(self) -> dict:
    return {"capacity": self.capacity, "kappa": self.kappa, "entries": [dict(e) for e in self.entries],
            "next_id": self.next_id, "rng": host_rng_state(self.rng), "counts": dict(self.counts)}

  def load_state_dict(self, state: dict) -> None:
    if state["capacity"] != self.capacity or state["kappa"] != self.kappa:
      raise ValueError(f"checkpoint buffer has capacity={state['capacity']} kappa={state['kappa']}, this run "
                       f"capacity={self.capacity} kappa={self.kappa}; resume with the same settings")
    self.entries = [dict(e) for e in state["entries"]]
    self.next_id = int(state["next_id"])
    set_host_rng_state(self.rng, state["rng"])
    self.counts = dict(state["counts"])
