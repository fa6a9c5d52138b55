"""running_sum: written solutions follow the rule, the verifier reads the last answer, splits never overlap."""
import re

import pytest

from exrl.tasks import get_task, get_verifier
from exrl.tasks.running_sum import RunningSumTask, solution


def test_solution_hand_built():
  assert solution(17, 5, 3) == "02:5:22,01:5:27,00:5:32. answer: 32"
  assert solution(98, 3, 1) == "00:3:01. answer: 01"  # wraps modulo 100, two digits


def test_problems_solutions_and_verifier():
  task = get_task("running_sum", min_steps=3, max_steps=30)
  problems = task.generate(200, seed=0)
  for p in problems:
    m = p.meta
    assert p.prompt == f"{m['steps']:02d}:{m['add']}:{m['start']:02d},"
    assert 3 <= m["steps"] <= 30
    target = task.sft_target(p)
    assert re.fullmatch(task.format_regex, target)
    assert target.count(",") + 1 == m["steps"]  # one "to_go:add:total" state per step
    assert target.startswith(f"{m['steps'] - 1:02d}:{m['add']}:") and f",00:{m['add']}:" in "," + target
    total = m["start"]
    for _ in range(m["steps"]):
      total = (total + m["add"]) % 100
    assert int(p.answer) == total
    assert task.verify(target, p) == 1.0
    assert get_verifier("running_sum")(target, p) == 1.0
    assert task.verify(target.rsplit(" ", 1)[0] + f" {(total + 1) % 100:02d}", p) == 0.0
  assert task.verify("", problems[0]) == 0.0


def test_eval_split_disjoint_across_lengths():
  short = get_task("running_sum", min_steps=2, max_steps=24).generate(2000, seed=0, split="train")
  long = get_task("running_sum", min_steps=10, max_steps=90).generate(500, seed=0, split="eval")
  assert not {p.prompt for p in short} & {p.prompt for p in long}


@pytest.mark.parametrize("kw, msg", [(dict(min_steps=0), "min_steps=0"), (dict(min_steps=5, max_steps=4), "max_steps=4"),
                                     (dict(max_steps=100), "max_steps=100")])
def test_bad_options(kw, msg):
  with pytest.raises(ValueError, match=msg):
    RunningSumTask(**kw)
