"""train_rl with max_lag: k = 0 never enters the async loop; k > 0 in the deterministic schedule logs the lags the
schedule fixes, and a resumed run restarts generation from the checkpointed params."""
import json

import pytest

from exrl.train import rl_loop
from exrl.infra.metrics import deterministic_lines
from tests.train import mini_rl


def _metrics(run_dir, field="metrics"):
  return [json.loads(line)[field] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_max_lag_0_is_the_synchronous_loop(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("max_lag=0 entered the async loop")
  monkeypatch.setattr(rl_loop, "train_async", refuse)
  mini_rl.run(str(tmp_path / "k0"), steps=2, max_lag=0)
  assert len(_metrics(tmp_path / "k0")) == 2 and not any("lag/mean" in m for m in _metrics(tmp_path / "k0"))


@pytest.mark.slow
def test_deterministic_async_run_and_resume(tmp_path):
  kw = dict(max_lag=2, async_schedule="deterministic", stale="rescore")
  straight = tmp_path / "straight"
  mini_rl.run(str(straight), steps=4, **kw)
  m = _metrics(straight)
  assert [x["lag/mean"] for x in m] == [0, 1, 2, 2]  # batch s is sampled by version max(0, s - 2)
  assert all(x["async/rescored_groups"] == 0 and x["lag/over_frac"] == 0 for x in m)
  for x in _metrics(straight, "timing"):
    assert 0 <= x["trainer_idle_frac"] <= 1 and 0 <= x["generator_idle_frac"] <= 1
  resumed = tmp_path / "resumed"
  mini_rl.run(str(resumed), steps=2, **kw)
  mini_rl.run(str(resumed), steps=4, **kw)  # resumes at step 2; rollouts in flight were not saved
  r = _metrics(resumed)
  assert deterministic_lines(resumed / "metrics.jsonl")[:2] == deterministic_lines(straight / "metrics.jsonl")[:2]
  assert [x["lag/mean"] for x in r] == [0, 1, 0, 1]  # generation restarted from the checkpoint's params (version 2)
