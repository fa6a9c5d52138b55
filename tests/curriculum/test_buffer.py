"""TaskBuffer against a plain reference: top-N replacement, inheritance, exp(κS) sampling, state round-trip."""
import json
import random

import numpy as np
import pytest
from scipy import stats

from exrl.curriculum.buffer import TaskBuffer


def reference_top_n(inserts, capacity):
  """Plain reference: a dict id -> score; when full, drop the (lowest score, oldest id) if new >= it."""
  held = {}
  for i, s in enumerate(inserts):
    if len(held) < capacity:
      held[i] = s
      continue
    victim = min(held, key=lambda j: (held[j], j))
    if s >= held[victim]:
      del held[victim]
      held[i] = s
  return held


def test_top_n_replacement_matches_reference():
  rng = random.Random(0)
  # Coarse scores force many ties, which exercise the "replace the oldest minimum" rule.
  inserts = [rng.choice([0.0, 0.05, 0.1, 0.2, 0.25]) for _ in range(300)]
  buf = TaskBuffer(capacity=17, kappa=5.0)
  ids = [buf.insert({"prompt": f"p{i}"}, [], s) for i, s in enumerate(inserts)]
  ref = reference_top_n(inserts, 17)
  insert_of = {bid: i for i, bid in enumerate(ids) if bid is not None}
  assert {insert_of[e["id"]]: e["score"] for e in buf.entries} == ref
  assert [i for i in ids if i is not None] == list(range(len(insert_of)))  # ids count accepted inserts
  assert buf.counts["rejected"] == sum(x is None for x in ids) > 0
  # A score below the minimum of a full buffer is rejected; one equal to it is kept.
  m = min(ref.values())
  assert m > 0
  assert buf.insert({"prompt": "low"}, [], m - 1e-6) is None
  assert buf.insert({"prompt": "eq"}, [], m) is not None


def test_children_inherit_parent_group_score_and_parent_is_rescored():
  buf = TaskBuffer(capacity=8, kappa=1.0)
  parent = buf.insert({"prompt": "a"}, [["x", 0.2]], 0.01)
  ids = buf.record_group(parent, 0.21, [({"prompt": "a"}, [["x", 0.2], ["y", 0.6]]),
                                        ({"prompt": "a"}, [["x", 0.2], ["z", 0.9]])])
  by_id = {e["id"]: e for e in buf.entries}
  assert by_id[parent]["score"] == pytest.approx(0.21)
  assert [by_id[i]["score"] for i in ids] == [pytest.approx(0.21)] * 2
  assert by_id[ids[1]]["history"] == [["x", 0.2], ["z", 0.9]]


def test_sampling_frequencies_follow_exp_kappa_score():
  kappa, scores = 8.0, [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
  buf = TaskBuffer(capacity=len(scores), kappa=kappa, seed=3)
  for i, s in enumerate(scores):
    buf.insert({"prompt": str(i)}, [], s)
  n = 20000
  counts = np.bincount([buf.sample()["id"] for _ in range(n)], minlength=len(scores))
  expected = np.exp(kappa * np.asarray(scores))
  expected = expected / expected.sum()
  np.testing.assert_allclose(buf.probabilities(), expected, rtol=1e-12)
  assert stats.chisquare(counts, n * expected).pvalue > 1e-3
  # And it can fail: uniform frequencies are rejected by the same test.
  assert stats.chisquare(counts, np.full(len(scores), n / len(scores))).pvalue < 1e-6


def test_state_round_trip_draws_the_same():
  a = TaskBuffer(capacity=10, kappa=4.0, seed=1)
  rng = random.Random(2)
  for i in range(25):
    a.insert({"prompt": f"p{i}", "meta": {"nums": [1, 2]}}, [[f"r{i}", rng.random()]], rng.random() / 4)
  for _ in range(7):
    a.sample()
  state = json.loads(json.dumps(a.state_dict()))  # what goes through checkpoint meta
  b = TaskBuffer(capacity=10, kappa=4.0, seed=99)
  b.load_state_dict(state)
  draws_a = [a.sample()["id"] for _ in range(50)]
  draws_b = [b.sample()["id"] for _ in range(50)]
  assert draws_a == draws_b
  a.insert({"prompt": "new"}, [], 0.3)
  b.insert({"prompt": "new"}, [], 0.3)
  assert a.state_dict() == b.state_dict()
  with pytest.raises(ValueError, match="capacity"):
    TaskBuffer(capacity=11, kappa=4.0).load_state_dict(state)


def test_bad_arguments():
  with pytest.raises(ValueError, match="capacity"):
    TaskBuffer(capacity=0, kappa=1.0)
  with pytest.raises(ValueError, match="kappa"):
    TaskBuffer(capacity=1, kappa=float("nan"))
  with pytest.raises(ValueError, match="empty"):
    TaskBuffer(capacity=1, kappa=1.0).sample()
  with pytest.raises(ValueError, match="finite"):
    TaskBuffer(capacity=1, kappa=1.0).insert({}, [], float("inf"))
