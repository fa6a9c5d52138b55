"""A miniature Early Experience run in CI: every stage (BC, branching, IWM, SR, AgentEvol RL, in- and
out-of-domain evaluation) runs end to end, and the result, table and plot agree with each other."""
import json

import pytest

from experiments import early_experience as exp


@pytest.mark.slow  # ~100 s of CPU, most of it compiling 7 SFT steps and the samplers' shapes
def test_mini_early_experience(tmp_path, capsys):
  out = exp.main(exp.Config(run_dir=str(tmp_path), tiny=True))
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(last) == json.loads(json.dumps(out)) == json.loads((tmp_path / "results.json").read_text())
  names = ["imitation", "imitation -> RL", "+IWM", "+IWM -> RL", "+SR", "+SR -> RL"]
  assert list(out["results"]) == names
  for name in names:
    for split in ("id", "ood"):
      for env in ("maze", "wordle", "textcraft"):
        r = out["results"][name][split][env]
        assert r["n"] == 2 and 0 <= r["ci95"][0] <= r["success"] <= r["ci95"][1] <= 1
  assert out["expert_states"] > 0 and sum(out["branches"].values()) > 0
  assert all(len(v) == 1 and v[0]["data"] == 9 + v[0]["kept"] for v in out["rl"].values())
  table = (tmp_path / "table.md").read_text()
  assert table.count("\n") == 2 + 2 * 4 and "| maze | OOD |" in table
  assert (tmp_path / "success.png").stat().st_size > 5000
  assert (tmp_path / "iwm" / "iwm_stage1").is_dir() and (tmp_path / "sr" / "sr").is_dir()
