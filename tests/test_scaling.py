"""ScaleRL sigmoid fit: synthetic recovery, bootstrap coverage, extrapolation, compute accounting, CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest

from exrl import scaling

TRUE = dict(A=0.62, B=1.5, C_mid=4e17, R0=0.1)


def _synthetic(seed, n=300, noise=0.01):
  """A run's curve: compute grows linearly with steps (as in a real run), Gaussian noise on the score."""
  c = np.linspace(1e16, 3e18, n)
  rng = np.random.default_rng(seed)
  return c, scaling.sigmoid_curve(c, **TRUE) + rng.normal(0, noise, n)


def test_curve_matches_formula():
  c = np.array([1.0, 2.0, 8.0])
  want = 0.2 + (0.7 - 0.2) / (1 + (2.0 / c) ** 1.3)  # hand formula; R(C_mid) is the half-way point
  np.testing.assert_allclose(scaling.sigmoid_curve(c, 0.7, 1.3, 2.0, 0.2), want)
  assert scaling.sigmoid_curve([2.0], 0.7, 1.3, 2.0, 0.2)[0] == pytest.approx(0.45)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_known_parameters(seed):
  c, y = _synthetic(seed)
  fit = scaling.fit_sigmoid(c, y)
  assert abs(fit.A - TRUE["A"]) <= 0.02, fit
  assert abs(fit.B - TRUE["B"]) <= 0.1 * TRUE["B"], fit
  assert abs(np.log(fit.C_mid / TRUE["C_mid"])) < 0.2, fit


def test_grid_only_is_close_and_polish_no_worse():
  c, y = _synthetic(3)
  coarse = scaling.fit_sigmoid(c, y, scaling.FitConfig(polish=False))
  fine = scaling.fit_sigmoid(c, y)
  assert fine.sse <= coarse.sse + 1e-12
  assert abs(coarse.A - TRUE["A"]) < 0.05


def test_bootstrap_interval_covers_truth_and_extrapolation_is_small():
  c, y = _synthetic(4)
  rep = scaling.fit_report(c, y, n_boot=20, seed=0)
  lo, hi = rep["ci95"]["A"]
  assert lo < rep["A"] < hi and hi - lo < 0.05
  assert lo - 0.01 <= TRUE["A"] <= hi + 0.01
  ex = rep["extrapolation"]
  assert ex["n_test"] == 150 and ex["rmse"] < 0.03, ex  # noise is 0.01; a bad half-fit misses by more


def test_extrapolation_detects_wrong_model():
  # A curve that keeps rising linearly has no asymptote: the half fit must extrapolate badly.
  c = np.linspace(1, 100, 200)
  y = 0.005 * c
  ex = scaling.extrapolation_error(c, y, scaling.FitConfig(a_max=0.3))
  assert ex["max_abs"] > 0.1


def test_flops_accounting():
  # 2N sampled + 2N scoring + 6N*epochs trained, per token
  assert scaling.rl_step_flops(10, 5, 8, inner_epochs=2) == 2 * 10 * 5 + 2 * 10 * 8 + 6 * 10 * 8 * 2
  recs = [{"step": i + 1, "metrics": {"accuracy": 0.1 * i, "response_len": 4.0}, "timing": {"step_s": 36.0}}
          for i in range(3)]
  c, y = scaling.compute_from_metrics(recs, score_key="accuracy", num_params=100, rows_per_step=2, prompt_tokens=6)
  per = scaling.rl_step_flops(100, 2 * 4, 2 * 10)
  np.testing.assert_allclose(c, [per, 2 * per, 3 * per])
  np.testing.assert_allclose(y, [0, 0.1, 0.2])
  c, _ = scaling.compute_from_metrics(recs, score_key="accuracy", unit="device_hours", device_count=4)
  np.testing.assert_allclose(c, [0.04, 0.08, 0.12])


def test_bad_input_names_the_problem(tmp_path):
  with pytest.raises(ValueError, match="compute must be > 0"):
    scaling.fit_sigmoid([0, 1, 2, 3, 4], [0, 0, 0, 0, 0])
  with pytest.raises(ValueError, match="score key 'acc'"):
    scaling.compute_from_metrics([{"metrics": {"accuracy": 1}}], score_key="acc", num_params=1, rows_per_step=1)
  bad = tmp_path / "bad.csv"
  bad.write_text("compute,score\n1,0.1\n2,oops\n")
  with pytest.raises(ValueError, match=r"bad.csv:3"):
    scaling.read_csv(bad)


def test_cli_csv(tmp_path):
  c, y = _synthetic(5, n=120)
  path = tmp_path / "curve.csv"
  path.write_text("compute,score\n" + "".join(f"{a},{b}\n" for a, b in zip(c, y)))
  out = subprocess.run([sys.executable, "-m", "experiments.scaling_fit", "--csv", str(path), "--n-boot", "5",
                        "--out-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert {"A", "B", "C_mid", "R0"} <= set(res)
  assert abs(res["A"] - TRUE["A"]) < 0.03
  assert (tmp_path / "out" / "fit.png").stat().st_size > 1000
  assert json.loads((tmp_path / "out" / "result.json").read_text())["A"] == res["A"]
