"""Countdown: parser against hand-evaluated expressions, graded score, generation, registry."""
from fractions import Fraction

import pytest

from exrl.tasks import VERIFIERS, get_task, get_verifier
from exrl.tasks.countdown import CountdownTask, countdown_score, evaluate_expression, verify_countdown


@pytest.mark.parametrize("expr,value,used", [
    ("3*7+5", 26, [3, 7, 5]), ("3*(7+5)", 36, [3, 7, 5]), ("8-3-2", 3, [8, 3, 2]), ("8/(3-1)", 4, [8, 3, 1]),
    ("7/2*2", 7, [7, 2, 2]), ("1/3", Fraction(1, 3), [1, 3]), (" 9 - 2 * 4 ", 1, [9, 2, 4])])
def test_evaluate_matches_hand_values(expr, value, used):
  assert evaluate_expression(expr) == (value, used)


@pytest.mark.parametrize("expr", ["", "3+", "(3+4", "3+4)", "3/(2-2)", "-3+4", "3 4", "3^2", "x", "1" * 100])
def test_evaluate_rejects_bad_expressions(expr):
  assert evaluate_expression(expr) is None


def test_graded_score():
  nums = [3, 5, 7]
  assert countdown_score("answer: 3*7+5", nums, 26, 10.0) == 1.0
  assert countdown_score("answer: 3*7+5.", nums, 26, 10.0) == 1.0
  assert countdown_score("first try. answer: 7*3-5", nums, 26, 10.0) == pytest.approx(1 - 10 / 10)
  assert countdown_score("answer: 3+5+7", nums, 26, 10.0) == 0.0  # 15: off by 11 > tolerance
  assert countdown_score("answer: 3*7+5", nums, 25, 10.0) == pytest.approx(0.9)
  assert countdown_score("answer: 7*5-3", nums, 26, 10.0) == pytest.approx(0.4)  # 32: off by 6
  assert countdown_score("answer: 3*7", nums, 21, 10.0) == 0.0  # 5 unused
  assert countdown_score("answer: 3*7+5+5", nums, 31, 10.0) == 0.0  # 5 used twice
  assert countdown_score("3*7+5", nums, 26, 10.0) == 0.0  # no marker
  assert countdown_score("answer: 3*7+5 wait", nums, 26, 10.0) == 0.0
  assert countdown_score(None, nums, 26, 10.0) == 0.0


def test_generate_split_solution_and_registry():
  task = get_task("countdown")
  train = task.generate(200, seed=0, split="train")
  ev = task.generate(100, seed=0, split="eval")
  assert not {p.prompt for p in train} & {p.prompt for p in ev}
  assert task.generate(5, seed=3) == task.generate(5, seed=3)
  for p in train[:50]:
    assert 1 <= int(p.answer) <= task.max_target
    assert task.verify(task.sft_target(p), p) == 1.0
    assert p.prompt == f"make {p.answer} from {' '.join(map(str, p.meta['numbers']))}:"
  assert VERIFIERS["countdown"] is verify_countdown and get_verifier("countdown") is verify_countdown
  with pytest.raises(ValueError, match="ops"):
    CountdownTask(ops="+/")
