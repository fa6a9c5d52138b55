"""A miniature quickstart in CI: the whole pipeline runs, metrics are finite, checkpoints round-trip."""
import dataclasses
import json

import chex
import jax
import numpy as np

from experiments import common, quickstart
from exrl.models import hf
from exrl.infra.checkpoint import Checkpointer
from exrl.train.evaluate import evaluate
from exrl.infra.metrics import read_jsonl


def test_mini_quickstart(tmp_path, capsys):
  cfg = quickstart.Config(run_dir=str(tmp_path), model=common.TinyModel(hidden_size=32, num_layers=2, num_heads=2,
                                                                         num_kv_heads=1, head_dim=16,
                                                                         intermediate_size=64),
                          sft_examples=256, sft=dataclasses.replace(quickstart.Config.sft, steps=6, batch_size=16),
                          rl=dataclasses.replace(quickstart.Config.rl, steps=3, prompts_per_step=2, group_size=4,
                                                 eval=dataclasses.replace(quickstart.Config.rl.eval, batch_size=16)),
                          eval_problems=16)
  out = quickstart.main(cfg)
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(last) == json.loads(json.dumps(out)) == json.loads((tmp_path / "results.json").read_text())
  for arm in ("base", "grpo", "intuitor"):
    lo, hi = out[arm]["pass1_ci95"]
    assert 0 <= lo <= out[arm]["pass1"] <= hi <= 1
  assert (tmp_path / "curves.png").stat().st_size > 5000
  for arm in ("grpo", "intuitor"):
    rows = read_jsonl(tmp_path / arm / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
      chex.assert_tree_all_finite(r["metrics"])

  # The last checkpoint holds the final policy: re-evaluating it reproduces the reported greedy accuracy,
  # and it survives an HF export and reload bit for bit.
  task = quickstart.task_for(cfg)
  tokenizer = common.build_tokenizer([task], tmp_path)
  model_config, params = common.init_model(cfg.model, tokenizer, cfg.seed)
  with Checkpointer(tmp_path / "grpo" / "ckpt") as ckpt:
    assert ckpt.latest_step() == 3
    template = quickstart.rl_config(cfg, "grpo", "verifier")
    from exrl.train.state import init_state, make_optimizer
    abstract = jax.eval_shape(lambda p: init_state(p, make_optimizer(template.optim, 3), 0), params)
    state, meta = ckpt.restore(abstract_state=abstract)
  assert meta["step"] == 3
  problems = task.generate(cfg.eval_problems, seed=cfg.seed, split="eval")
  again = evaluate(model_config, state.params, tokenizer, problems, task.verify, template.eval)
  assert again["greedy"] == out["grpo"]["greedy"]
  hf.save(model_config, state.params, tmp_path / "export")
  _, reloaded = hf.load(tmp_path / "export")
  chex.assert_trees_all_equal(reloaded, jax.device_get(state.params))
  assert not np.allclose(np.asarray(reloaded["embed"]), np.asarray(params["embed"]))  # training moved it
