"""A miniature experiments.delethink: SFT with chunk rows, both RL arms through train_rl, the budget table."""
import dataclasses
import json

import numpy as np

from experiments import common, delethink
from exrl.rollout.markov import MarkovConfig
from exrl.tasks.running_sum import RunningSumTask
from exrl.infra.metrics import read_jsonl


def test_mini_delethink(tmp_path, capsys):
  mk = MarkovConfig(chunk_size=24, carryover=12, head=4, max_chunks=3)  # budget 24 + 2 * 12 = 48 tokens
  cfg = delethink.Config(
      run_dir=str(tmp_path), markov=mk, model=common.TinyModel(hidden_size=32, num_layers=2, num_heads=2,
                                                                num_kv_heads=1, head_dim=16, intermediate_size=64),
      sft_task=RunningSumTask(2, 5), rl_task=RunningSumTask(2, 5), eval_task=RunningSumTask(3, 12),
      chunk_task=RunningSumTask(6, 12), sft_examples=64, chunk_traces=8, budget_multiples=(1, 2),
      sft=dataclasses.replace(delethink.Config.sft, steps=4, batch_size=8, max_len=64),
      rl=dataclasses.replace(delethink.Config.rl, steps=2, prompts_per_step=2, group_size=2), eval_problems=8,
      eval_batch=8)
  rows = delethink.markov_sft_rows(cfg, common.build_tokenizer([cfg.sft_task, cfg.eval_task], tmp_path, vocab_size=48))
  assert all(len(ids) == len(mask) <= 1 + 9 + mk.chunk_size for ids, mask in rows)  # bos + query + one chunk
  out = delethink.main(cfg)
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(out))
  assert len(out["results"]) == 3 * 2 * 2 and out["train_budget"] == 48
  for key, r in out["results"].items():
    lo, hi = r["ci95"]
    assert 0 <= lo <= r["acc"] <= hi <= 1, key
    chunks = MarkovConfig.for_budget(r["budget"], 24, 12, 4).max_chunks
    assert r["chunks"] == (1 if "longcot-inference" in key else chunks)
  for arm in ("longcot", "delethink"):
    metrics = read_jsonl(tmp_path / arm / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(v) for m in metrics for v in m["metrics"].values())
  assert (tmp_path / "accuracy_vs_budget.png").stat().st_size > 5000
  assert "| delethink | delethink |" in (tmp_path / "table.md").read_text()
