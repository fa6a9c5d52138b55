"""ScaleRL sigmoid compute-scaling fit of a run's score (arXiv 2510.13786, exrl/scaling.py).

  python -m experiments.scaling_fit --csv curve.csv                     # columns: compute (or flops / gpu_hours), score
  python -m experiments.scaling_fit --metrics runs/grpo/metrics.jsonl --num-params 1.5e9 --prompt-tokens 200
  python -m experiments.scaling_fit --metrics runs/grpo/metrics.jsonl --unit device_hours --device-count 8

Fits R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B) by the paper's procedure (early points dropped, grid over A and
C_mid, least-squares B, polished), with 95% residual-bootstrap intervals and the error of a fit on the first half
of compute extrapolated to the second; writes fit.png and result.json to --out-dir.
Runtime: about 10 s for a few hundred points with 100 bootstrap replicates on 2 CPU cores.
Result (tests/test_scaling.py, synthetic A=0.62, B=1.5, 300 points, noise 0.01): A recovered within 0.02, B within 10%.
For a metrics file, rows per step and inner epochs are read from the run's config.json when it sits next to it.
The last stdout line is the JSON result with keys A, B, C_mid, R0 (plus ci95, extrapolation, sse, n_points).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import tyro

from exrl import scaling
from exrl.infra.metrics import read_jsonl


@dataclasses.dataclass(frozen=True)
class Config:
  csv: str | None = None  # CSV with `score` and one of compute / flops / gpu_hours
  metrics: str | None = None  # an exrl metrics.jsonl
  score_key: str = "accuracy"  # metric fitted from --metrics (e.g. accuracy, reward_mean, eval/pass1)
  unit: Literal["flops", "device_hours"] = "flops"  # how --metrics steps are turned into compute
  num_params: float = 0.0  # model parameters, for unit=flops
  prompt_tokens: float = 0.0  # mean prompt length in tokens, for unit=flops
  rows_per_step: int = 0  # 0: prompts_per_step * group_size from the run's config.json
  inner_epochs: int = 0  # 0: from the run's config.json (else 1)
  device_count: int = 1  # for unit=device_hours
  fit: scaling.FitConfig = scaling.FitConfig()
  n_boot: int = 100
  seed: int = 0
  out_dir: str = "runs/scaling_fit"


def load_points(cfg: Config):
  if (cfg.csv is None) == (cfg.metrics is None):
    raise SystemExit("give exactly one of --csv FILE or --metrics FILE")
  if cfg.csv:
    return (*scaling.read_csv(cfg.csv), "compute")
  path = Path(cfg.metrics)
  run_cfg = json.loads((path.parent / "config.json").read_text()) if (path.parent / "config.json").exists() else {}
  rows = cfg.rows_per_step or run_cfg.get("prompts_per_step", 0) * run_cfg.get("group_size", 0)
  epochs = cfg.inner_epochs or run_cfg.get("inner_epochs", 1)
  compute, score = scaling.compute_from_metrics(
      read_jsonl(path), score_key=cfg.score_key, num_params=int(cfg.num_params), rows_per_step=rows,
      prompt_tokens=cfg.prompt_tokens, inner_epochs=epochs, device_count=cfg.device_count, unit=cfg.unit)
  return compute, score, "FLOPs" if cfg.unit == "flops" else "device-hours"


def main(cfg: Config) -> dict:
  compute, score, unit = load_points(cfg)
  result = scaling.fit_report(compute, score, cfg.fit, n_boot=cfg.n_boot, seed=cfg.seed)
  out = Path(cfg.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  fit = scaling.Fit(A=result["A"], B=result["B"], C_mid=result["C_mid"], R0=result["R0"], sse=result["sse"],
                    n=result["n_points"])
  half = result["extrapolation"].get("fit_first_half")
  scaling.plot_fit(compute, score, fit, out / "fit.png", half_fit=half, xlabel=unit)
  result.update(unit=unit, plot=str(out / "fit.png"))
  (out / "result.json").write_text(json.dumps(result, indent=2))
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main(tyro.cli(Config, description=__doc__))
