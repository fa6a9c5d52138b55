"""experiments.grpo --eval-data: a tiny run evaluates on that file alone and trains on all of --data."""
import json

import pytest

from experiments import grpo
from tests.models.hf_fixtures import make_hf_model
from tests.test_tokenizer import CHAT_TEMPLATE, _save_hf_tokenizer


def _write(path, pairs):
  with open(path, "w") as f:
    for a, b in pairs:
      f.write(json.dumps({"q": f"What is {a}+{b}?", "a": f"#### {a + b}"}) + "\n")


def test_eval_data_is_the_only_eval_set(tmp_path, monkeypatch, capsys):
  model_dir = tmp_path / "model"
  _save_hf_tokenizer(model_dir, chat_template=CHAT_TEMPLATE)
  make_hf_model("qwen2", model_dir, vocab_size=384)
  _write(tmp_path / "train.jsonl", [(a, a + 1) for a in range(30)])
  _write(tmp_path / "test.jsonl", [(100 + a, 7) for a in range(3)])
  seen = {}
  real_train_rl = grpo.train_rl

  def spy(cfg, config, params, tokenizer, source, *, eval_problems, **kw):  # records what the real run gets
    seen["eval"] = [p.answer for p in eval_problems]
    return real_train_rl(cfg, config, params, tokenizer, source, eval_problems=eval_problems, **kw)

  monkeypatch.setattr(grpo, "train_rl", spy)
  base = ["--model", str(model_dir), "--data", str(tmp_path / "train.jsonl"), "--question-field", "q",
          "--answer-field", "a", "--no-export", "--rl.steps", "1", "--rl.prompts-per-step", "2",
          "--rl.group-size", "2", "--rl.sampling.max-new-tokens", "4", "--rl.eval.sampling.max-new-tokens", "4",
          "--rl.eval.batch-size", "4"]
  out = grpo.main(grpo.parse(base + ["--eval-data", str(tmp_path / "test.jsonl"), "--rl.run-dir",
                                     str(tmp_path / "run")]))
  log = capsys.readouterr().out
  assert sorted(seen["eval"]) == ["107", "108", "109"] and out["eval"]["n"] == 3 and out["eval_problems"] == 3
  assert "[grpo] 30 train problems" in log  # every row of --data trains
  assert f"eval set: 3 of 3 problems from {tmp_path / 'test.jsonl'} (--eval-data)" in log

  # the default stays the hash split of --data, and says so (the run is stopped once train_rl is called)
  class Stop(Exception):
    pass

  def spy_and_stop(cfg, config, params, tokenizer, source, *, eval_problems, **kw):
    seen["eval"] = [p.answer for p in eval_problems]
    raise Stop

  monkeypatch.setattr(grpo, "train_rl", spy_and_stop)
  with pytest.raises(Stop):
    grpo.main(grpo.parse(base + ["--rl.run-dir", str(tmp_path / "run_split")]))
  log = capsys.readouterr().out
  split = grpo.MathDatasetTask(str(tmp_path / "train.jsonl"), "q", "a")
  assert sorted(seen["eval"]) == sorted(p.answer for p in split.problems("eval"))
  assert f"problems from the hash split of {tmp_path / 'train.jsonl'}" in log
  assert f"[grpo] {len(split.problems('train'))} train problems" in log
