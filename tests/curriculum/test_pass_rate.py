"""PassRateSource (ScaleRL no-positive-resampling) against a numpy oracle of the pass-rate history."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from exrl.curriculum.pass_rate import PassRateSource, problem_key
from exrl.curriculum.source import DatasetSource
from exrl.tasks.base import Problem

G = 4
PROBLEMS = [Problem(prompt=f"{i}+{i}=", answer=str(2 * i), task="add") for i in range(12)]
SKILL = {p.prompt: s for p, s in zip(PROBLEMS, np.linspace(0.0, 1.0, 12))}  # per-problem success probability


def _experience(problems, rng, field="correct"):
  idx = np.repeat(np.arange(len(problems)), G)
  ok = np.array([rng.random() < SKILL[problems[i].prompt] for i in idx], np.float32)
  traces = {"problem": idx, "text": [""] * idx.size, "reward": ok, "length": np.ones(idx.size)}
  if field == "correct":
    traces["correct"] = ok
    traces["reward"] = ok * 0.5  # the correctness field, not the reward, decides a pass when present
  return SimpleNamespace(traces=traces)


def _run(src, steps, seed=0, start=0, field="correct"):
  rng = np.random.default_rng(seed + start)
  served, log = [], []
  for step in range(start, steps):
    probs = src.batch(step, 3)
    served.append([p.prompt for p in probs])
    exp = _experience(probs, rng, field)
    src.update(probs, exp)
    log.append((probs, exp))
  return served, log


@pytest.mark.parametrize("field", ["correct", "reward"])
def test_drops_exactly_the_problems_at_or_above_threshold(field):
  src = PassRateSource(DatasetSource(PROBLEMS, seed=1), threshold=0.9, min_attempts=G)
  served, log = _run(src, 30, field=field)
  # Oracle: replay the step log in numpy, in order; a problem is dropped after the first update that puts its
  # cumulative pass rate at or above 0.9, and must never be served after that.
  passes, tries, dropped_at = {}, {}, {}
  for step, (probs, exp) in enumerate(log):
    for j, p in enumerate(probs):
      assert p.prompt not in dropped_at, f"{p.prompt} served at step {step} after being dropped"
      ok = np.asarray(exp.traces["correct" if field == "correct" else "reward"])[exp.traces["problem"] == j]
      passes[p.prompt] = passes.get(p.prompt, 0) + int(np.sum(ok >= 1.0 if field == "reward" else ok > 0))
      tries[p.prompt] = tries.get(p.prompt, 0) + ok.size
      if passes[p.prompt] / tries[p.prompt] >= 0.9:
        dropped_at.setdefault(p.prompt, step)
  assert {problem_key(p) for p in PROBLEMS if p.prompt in dropped_at} == src.dropped
  assert dropped_at, "the always-solved problem must be dropped"
  assert "11+11=" in dropped_at and "0+0=" not in dropped_at
  for p in PROBLEMS:
    if p.prompt in tries:
      assert src.pass_rate(p) == pytest.approx(passes[p.prompt] / tries[p.prompt])
  assert all(len(b) == 3 for b in served)
  assert src.skipped > 0


def test_resume_from_state_dict_serves_the_same_problems():
  straight = PassRateSource(DatasetSource(PROBLEMS, seed=2), min_attempts=G)
  want, _ = _run(straight, 20)
  first = PassRateSource(DatasetSource(PROBLEMS, seed=2), min_attempts=G)
  rng = np.random.default_rng(0)
  got = []
  for step in range(10):  # the same random stream as _run for the first 10 steps
    probs = first.batch(step, 3)
    got.append([p.prompt for p in probs])
    first.update(probs, _experience(probs, rng))
  state = json.loads(json.dumps(first.state_dict()))  # as it goes through the checkpoint meta
  resumed = PassRateSource(DatasetSource(PROBLEMS, seed=2), min_attempts=G)
  resumed.load_state_dict(state)
  for step in range(10, 20):
    probs = resumed.batch(step, 3)
    got.append([p.prompt for p in probs])
    resumed.update(probs, _experience(probs, rng))
  assert got == want
  assert resumed.state_dict() == straight.state_dict()


def test_everything_solved_is_a_clear_error_and_bad_state_is_refused():
  src = PassRateSource(DatasetSource(PROBLEMS[-1:]), min_attempts=1, max_draws_per_batch=3)
  probs = src.batch(0, 1)
  src.update(probs, SimpleNamespace(traces={"problem": [0], "text": [""], "reward": [1.0], "length": [1]}))
  with pytest.raises(RuntimeError, match="solves \\(nearly\\) the whole source"):
    src.batch(1, 1)
  with pytest.raises(ValueError, match="not 'pass_rate'"):
    PassRateSource(DatasetSource(PROBLEMS)).load_state_dict({"kind": "dataset"})
  with pytest.raises(ValueError, match="threshold"):
    PassRateSource(DatasetSource(PROBLEMS), threshold=0.8).load_state_dict(src.state_dict())
  with pytest.raises(ValueError, match="threshold=1.5"):
    PassRateSource(DatasetSource(PROBLEMS), threshold=1.5)
