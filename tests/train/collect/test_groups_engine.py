"""GroupCollector through the continuous engine and with length interruption, on a tiny model in train_rl."""
import json

import numpy as np

from exrl.rollout.sampler import SamplingConfig
from tests.train import mini_rl


def _rows(run_dir):
  return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_continuous_engine_trains_through_the_loop(tmp_path):
  mini_rl.run(str(tmp_path), steps=2, sampling=SamplingConfig(max_new_tokens=4, engine="continuous", slots=6))
  rows = _rows(tmp_path)
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert np.isfinite(r["metrics"]["loss"]) and 0 < r["metrics"]["response_len"] <= 4


def test_length_interruption_through_the_loop(tmp_path):
  """A 2-token thinking budget, then the interruption phrase and 2 answer tokens: no response exceeds 2 + 2
  sampled tokens (the injected ones carry no loss, so response_len counts only sampled ones)."""
  mini_rl.run(str(tmp_path), steps=1, sampling=SamplingConfig(max_new_tokens=8, think_budget=2, answer_budget=2,
                                                               interrupt_text="1+1="))
  (row,) = _rows(tmp_path)
  assert np.isfinite(row["metrics"]["loss"]) and row["metrics"]["response_len"] <= 4
