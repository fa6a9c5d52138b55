"""ExItSource: mixing, self-iteration prompts, improvement reward, inheritance, bad input, resume."""
import dataclasses
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest

from exrl.curriculum.exit_source import ExItConfig, ExItSource
from exrl.curriculum.source import TaskSource
from exrl.tasks import get_task
from exrl.tasks import self_iteration as si
from exrl.tasks.countdown import countdown_score
from exrl.tasks.pool import VerifierPool

G = 4


@pytest.fixture(scope="module")
def pool():
  with VerifierPool(num_workers=1, timeout_s=5.0) as p:
    yield p


def fake_experience(problems, rng):
  """G responses per problem: countdown expressions over the problem's numbers (some exact, some off)."""
  texts, rewards, pidx = [], [], []
  for j, p in enumerate(problems):
    b = si.base_problem(p)
    nums = list(b.meta["numbers"])
    for _ in range(G):
      rng.shuffle(nums)
      expr = b.solution if rng.random() < 0.3 else f"{nums[0]}+{nums[1]}*{nums[2]}"
      text = f"answer: {expr}"
      q = countdown_score(text, b.meta["numbers"], int(b.answer), 10.0)
      r = si.improvement_reward(q, p.meta["prev_score"], True) if p.task == si.TASK_NAME else q
      texts.append(text), rewards.append(r), pidx.append(j)
  return SimpleNamespace(traces={"problem": np.asarray(pidx), "text": texts, "reward": np.asarray(rewards)},
                         metrics={})


def test_improvement_reward_formula():
  for new, prev in [(0.9, 0.5), (0.2, 0.5), (1.0, 0.0), (0.3, 0.3)]:
    assert si.improvement_reward(new, prev, True) == pytest.approx(max(0.0, (new - prev) / (1 - prev)))
  assert si.improvement_reward(0.7, 1.0, True) == 0.7  # nothing left to improve: the new quality itself
  assert si.improvement_reward(1.0, 1.0, False) == 1.0 and si.improvement_reward(0.0, 0.0, False) == 0.0
  task = get_task("countdown")
  b = task.generate(1, seed=0)[0]
  p = si.self_iteration_problem(b, [["answer: 1", 0.0], ["answer: bad", 0.4]], "improve", graded=True)
  assert p.task == "self_iteration" and p.answer == b.answer and p.meta["k"] == 2
  assert p.prompt == si.IMPROVE_TEMPLATE.format(request=b.prompt, response="answer: bad")
  assert "answer: 1" not in p.prompt  # only the latest response enters the prompt
  assert si.verify_improvement(task.sft_target(b), p) == 1.0
  assert si.verify_improvement("answer: 1+2", p) == 0.0
  assert "SIGNIFICANTLY" in si.self_iteration_problem(b, [["x", 0.0]], "diverge", True).prompt


def test_children_inherit_group_variance_and_mixing(pool):
  task = get_task("countdown")
  cfg = ExItConfig(capacity=64, min_size=8, p=0.5, p_div=0.25, seed=1)
  src = ExItSource(TaskSource(task), cfg, pool=pool)
  rng = random.Random(0)
  probs = src.batch(0, 6)
  assert all(p.task == "countdown" for p in probs)  # buffer empty: base tasks only
  exp = fake_experience(probs, rng)
  src.update(probs, exp)
  tr = exp.traces
  want = 0
  for j, p in enumerate(probs):
    idx = np.flatnonzero(tr["problem"] == j)
    s = float(np.var(tr["reward"][idx]))
    kids = [e for e in src.buffer.entries if e["problem"]["prompt"] == p.prompt]
    texts = sorted({tr["text"][i] for i in idx})
    want += len(texts)
    assert sorted(e["history"][0][0] for e in kids) == texts  # one child per distinct response
    for e in kids:
      assert e["score"] == pytest.approx(s) and e["k"] == 1
      assert e["history"][0][1] == pytest.approx(countdown_score(e["history"][0][0], p.meta["numbers"],
                                                                 int(p.answer), 10.0))
  assert len(src.buffer) == want >= 8 and exp.metrics["exit/buffer_size"] == want
  # Buffer full enough: about p of the slots are self-iteration steps, about p_div of those diverge.
  drawn = [p for s in range(1, 41) for p in src.batch(s, 10)]
  si_frac = np.mean([p.task == "self_iteration" for p in drawn])
  assert 0.4 < si_frac < 0.6
  div = [p.meta["mode"] == "diverge" for p in drawn if p.task == "self_iteration"]
  assert 0.12 < np.mean(div) < 0.38
  # One more round from self-iteration problems: children extend the parent's history.
  probs = src.batch(50, 6)
  assert any(p.task == "self_iteration" for p in probs)
  exp = fake_experience(probs, rng)
  src.update(probs, exp)
  for p in probs:
    if p.task == "self_iteration":
      kids = [e for e in src.buffer.entries if e["k"] == p.meta["k"] + 1
              and e["history"][:-1] == p.meta["history"][-cfg.max_turns + 1:]]
      assert kids


def test_curriculum_only_reserves_base_tasks(pool):
  cfg = ExItConfig(capacity=16, min_size=2, p=1.0, improve=False)
  src = ExItSource(TaskSource(get_task("countdown")), cfg, pool=pool)
  probs = src.batch(0, 4)
  src.update(probs, fake_experience(probs, random.Random(0)))
  assert len(src.buffer) == 4 and all(e["history"] == [] for e in src.buffer.entries)
  again = src.batch(1, 4)
  assert {p.prompt for p in again} <= {p.prompt for p in probs} and all(p.task == "countdown" for p in again)
  src.update(again, fake_experience(again, random.Random(1)))
  assert len(src.buffer) == 4  # drawn entries are re-scored, not duplicated


def test_p_zero_is_plain_grpo(pool):
  src = ExItSource(TaskSource(get_task("countdown")), ExItConfig(p=0.0, min_size=0), pool=pool)
  probs = src.batch(0, 4)
  src.update(probs, fake_experience(probs, random.Random(0)))
  assert len(src.buffer) == 0 and all(p.task == "countdown" for p in src.batch(1, 4))


def test_bad_input_is_skipped_and_counted(pool):
  task = get_task("countdown")
  src = ExItSource(TaskSource(task), ExItConfig(capacity=64, min_size=1), pool=pool, count_tokens=len)
  good, bad = task.generate(2, seed=5)
  bad = dataclasses.replace(bad, meta={})  # its verifier raises KeyError('numbers')
  exp = fake_experience([good, good], random.Random(0))
  src.update([good, bad], exp)
  assert src.counts["skipped_verifier"] == 1
  assert {e["problem"]["prompt"] for e in src.buffer.entries} == {good.prompt}
  # Over the prompt budget: a child whose revise prompt would not fit is never inserted.
  budget = len(si.build_prompt(good.prompt, "answer: 1+2*3", "diverge")) - 1
  small = ExItSource(TaskSource(task), ExItConfig(capacity=64, min_size=1, prompt_budget=budget), pool=pool)
  small.update([good], fake_experience([good], random.Random(0)))
  assert small.counts["skipped_budget"] >= 1
  assert all(len(si.build_prompt(good.prompt, e["history"][-1][0], "diverge")) <= budget
             for e in small.buffer.entries)


def test_resume_draws_the_same(pool):
  task = get_task("countdown")
  cfg = ExItConfig(capacity=12, min_size=4, p=0.7, p_div=0.3, seed=2)
  a = ExItSource(TaskSource(task), cfg, pool=pool)
  rng = random.Random(0)
  for step in range(3):
    probs = a.batch(step, 5)
    a.update(probs, fake_experience(probs, rng))
  state = json.loads(json.dumps(a.state_dict()))  # the checkpoint meta round trip
  b = ExItSource(TaskSource(task), cfg, pool=pool)
  b.load_state_dict(state)
  for step in range(3, 6):
    pa, pb = a.batch(step, 5), b.batch(step, 5)
    assert [(p.prompt, p.task) for p in pa] == [(p.prompt, p.task) for p in pb]
    ea, eb = fake_experience(pa, random.Random(step)), fake_experience(pb, random.Random(step))
    a.update(pa, ea), b.update(pb, eb)
  assert a.state_dict() == b.state_dict()
  with pytest.raises(ValueError, match="config"):
    ExItSource(TaskSource(task), dataclasses.replace(cfg, p=0.1), pool=pool).load_state_dict(state)
