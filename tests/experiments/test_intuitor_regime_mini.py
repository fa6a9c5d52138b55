"""experiments.intuitor_regime end to end at a tiny size (SFT base on the mix, two RL arms, eval on three splits,
the answer probe, tables and plot), a re-run that reads finished arms back, and the seed aggregation against
hand-computed pooled and paired intervals."""
import json

import numpy as np
import scipy.stats
import tyro

from experiments import intuitor_regime as regime
from exrl.train.evaluate import wilson_interval


def test_mini_regime_runs_and_resumes(tmp_path):
  argv = ["--run-dir", str(tmp_path), "--arms", "grpo", "intuitor", "--sft.steps", "8", "--rl.steps", "2",
          "--rl.prompts-per-step", "2", "--rl.group-size", "4", "--eval-problems", "6", "--probe-problems", "3",
          "--probe-samples", "2", "--sft-examples-per-family", "40", "--rl.sampling.max-new-tokens", "16",
          "--rl.eval.sampling.max-new-tokens", "16"]
  cfg = tyro.cli(regime.Config, args=argv)
  out = regime.main(cfg)
  assert set(out["summary"]) == {"base", "grpo", "intuitor"}
  for name in ("base", "grpo", "intuitor"):
    a = json.loads((tmp_path / "seed0" / name / "assessment.json").read_text())
    assert {"in", "chain5", "3digit", "probe"} <= set(a) and a["in"]["n"] == 6
  assert (tmp_path / "table.md").read_text().startswith("| model |") and (tmp_path / "accuracy.png").exists()
  again = regime.main(cfg)  # everything is read back from the run folder
  assert again["summary"] == out["summary"]


def _cell(p1, n=10):
  return {"pass1": p1, "greedy": p1, "n": n, "mean_len": 3.0}


def test_summarise_pooled_and_paired_intervals():
  per_seed = []
  for base, arm in [(0.2, 0.5), (0.4, 0.5), (0.3, 0.9)]:
    row = {}
    for name, p in (("base", base), ("arm", arm)):
      row[name] = {split: _cell(p) for split in regime.SPLITS}
      row[name]["probe"] = {"self_certainty": 1.0, "entropy": 0.5, "distinct_per_problem": 2.0, "top3_share": 0.5}
      if name == "arm":
        row[name].update(sc_acc_corr_first10=0.1, train_last10={"kl": 0.01})
    per_seed.append(row)
  s = regime.summarise(per_seed, ["base", "arm"])
  cell = s["arm"]["in_pass1"]
  assert cell["mean"] == (5 + 5 + 9) / 30 and cell["ci95"] == list(wilson_interval(19, 30))
  d = np.array([0.3, 0.1, 0.6])  # arm minus base, per seed
  np.testing.assert_allclose(s["arm"]["in_pass1_minus_base"]["ci95"],
                             scipy.stats.t.interval(0.95, df=2, loc=d.mean(), scale=scipy.stats.sem(d)))
  one = regime.summarise(per_seed[:1], ["base", "arm"])
  assert one["arm"]["in_pass1_minus_base"]["ci95"] is None
  np.testing.assert_allclose(one["arm"]["in_pass1_minus_base"]["mean"], 0.3)
