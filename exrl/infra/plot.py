"""PNG learning curves from metrics.jsonl (see `exrl.infra.metrics`).

  python -m exrl.infra.plot runs/grpo                       # -> runs/grpo/plots/*.png
  python -m exrl.infra.plot runs/grpo runs/intuitor --keys reward/mean acc --out cmp/

One run: a grid figure `curves.png` plus one `<key>.png` per metric. Several runs: one grid
figure `compare.png` with a line per run. Curves show the raw values faintly and a debiased
exponential moving average (TensorBoard's smoothing) on top.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

from exrl.infra.metrics import METRICS_FILE, read_jsonl  # noqa: E402

_WALL_CLOCK = ("time", "elapsed_s")  # timing fields that are not worth a curve


def load_series(jsonl_path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """metric name -> (steps_N, values_N), float64; timing fields are prefixed `timing/`.

  When a step is logged several times the last value wins.
  """
  by_key: dict[str, dict[int, float]] = {}
  for record in read_jsonl(jsonl_path):
    step = record["step"]
    for name, value in record.get("metrics", {}).items():
      by_key.setdefault(name, {})[step] = value
    for name, value in record.get("timing", {}).items():
      if name not in _WALL_CLOCK:
        by_key.setdefault(f"timing/{name}", {})[step] = value
  series = {}
  for name, points in by_key.items():
    steps = np.array(sorted(points), dtype=np.float64)
    series[name] = (steps, np.array([points[int(s)] for s in steps], dtype=np.float64))
  return series


def ema(values_N: np.ndarray, smooth: float) -> np.ndarray:
  """Debiased exponential moving average with weight `smooth` in [0, 1); NaNs are skipped."""
  if not 0.0 <= smooth < 1.0:
    raise ValueError(f"smooth={smooth} must be in [0, 1) (0 = no smoothing)")
  out_N = np.empty_like(values_N, dtype=np.float64)
  acc, norm = 0.0, 0.0
  for i, v in enumerate(values_N):
    if math.isfinite(v):
      acc, norm = smooth * acc + (1.0 - smooth) * v, smooth * norm + (1.0 - smooth)
    out_N[i] = acc / norm if norm > 0 else np.nan
  return out_N


def _resolve_jsonl(path: str | Path) -> Path:
  path = Path(path)
  jsonl = path / METRICS_FILE if path.is_dir() else path
  if not jsonl.is_file():
    raise FileNotFoundError(f"no metrics file at {jsonl} (expected a run dir or a .jsonl path)")
  return jsonl


def _pick_keys(available: Sequence[str], keys: Sequence[str] | None) -> list[str]:
  if keys is None:
    return sorted(available)
  missing = [k for k in keys if k not in available]
  if missing:
    raise KeyError(f"metrics {missing} not in the log; available: {sorted(available)}")
  return list(keys)


def _grid(n: int) -> tuple[plt.Figure, list[plt.Axes]]:
  cols = min(3, n)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
  flat = list(axes.ravel())
  for ax in flat[n:]:
    ax.set_visible(False)
  return fig, flat[:n]


def _draw(ax: plt.Axes, steps_N, values_N, smooth: float, label: str | None, color) -> None:
  if smooth > 0 and len(values_N) > 1:
    ax.plot(steps_N, values_N, color=color, alpha=0.25, linewidth=1)
  ax.plot(steps_N, ema(values_N, smooth), color=color, linewidth=1.8, label=label)


def _style(ax: plt.Axes, key: str) -> None:
  ax.set_title(key, fontsize=10)
  ax.set_xlabel("step", fontsize=9)
  ax.tick_params(labelsize=8)
  ax.grid(alpha=0.3)


def _filename(key: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".png"


def plot_metrics(jsonl_path: str | Path, out_dir: str | Path, keys: Sequence[str] | None = None,
                 smooth: float = 0.6) -> list[Path]:
  """Writes `out_dir/curves.png` (all keys in a grid) and `out_dir/<key>.png`; returns paths."""
  series = load_series(_resolve_jsonl(jsonl_path))
  if not series:
    raise ValueError(f"{jsonl_path} holds no metrics to plot")
  keys = _pick_keys(list(series), keys)
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  color = "C0"
  fig, axes = _grid(len(keys))
  for ax, key in zip(axes, keys):
    _draw(ax, *series[key], smooth, None, color)
    _style(ax, key)
  fig.tight_layout()
  written = [out_dir / "curves.png"]
  fig.savefig(written[0], dpi=110)
  plt.close(fig)
  for key in keys:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    _draw(ax, *series[key], smooth, None, color)
    _style(ax, key)
    fig.tight_layout()
    written.append(out_dir / _filename(key))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
  return written


def plot_runs(runs: Mapping[str, str | Path], keys: Sequence[str] | None, out_png: str | Path,
              smooth: float = 0.6) -> Path:
  """One grid figure comparing runs (label -> run dir or jsonl); one line per run per key.

  `keys=None` plots the metrics that every run has.
  """
  if not runs:
    raise ValueError("runs is empty; pass {label: run_dir_or_jsonl, ...}")
  series = {label: load_series(_resolve_jsonl(path)) for label, path in runs.items()}
  common = set.intersection(*(set(s) for s in series.values()))
  if keys is None:
    keys = sorted(common)
    if not keys:
      raise ValueError(f"runs {list(runs)} share no metric names")
  else:
    for label, s in series.items():
      _pick_keys(list(s), keys)  # raises naming the run's available metrics
  fig, axes = _grid(len(keys))
  for ax, key in zip(axes, keys):
    for i, (label, s) in enumerate(series.items()):
      _draw(ax, *s[key], smooth, label, f"C{i}")
    _style(ax, key)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  out_png = Path(out_png)
  out_png.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
  return out_png


@dataclasses.dataclass(frozen=True)
class PlotArgs:
  """Plot metrics.jsonl curves: one run gets a PNG per metric group, several runs one comparison figure."""
  runs: tyro.conf.Positional[tuple[str, ...]]  # run dirs (holding metrics.jsonl) or .jsonl files
  keys: tuple[str, ...] | None = None  # metric names (default: all)
  smooth: float = 0.6  # EMA weight in [0, 1)
  out: str | None = None  # output dir (default: RUN/plots for one run, ./plots for several)


def main(argv: Sequence[str] | None = None) -> list[Path]:
  args = tyro.cli(PlotArgs, args=argv)
  if not args.runs:
    raise SystemExit("error: give at least one run dir (holding metrics.jsonl) or .jsonl file")
  keys = list(args.keys) if args.keys is not None else None
  if len(args.runs) == 1:
    run = Path(args.runs[0])
    out = Path(args.out) if args.out else (run if run.is_dir() else run.parent) / "plots"
    written = plot_metrics(run, out, keys, args.smooth)
  else:
    runs = {}
    for path in args.runs:
      p = Path(path)
      label = p.name if p.is_dir() else p.parent.name
      runs[label if label not in runs else str(p)] = p
    out = Path(args.out) if args.out else Path("plots")
    written = [plot_runs(runs, keys, out / "compare.png", args.smooth)]
  print(json.dumps({"plots": [str(p) for p in written]}))
  return written


if __name__ == "__main__":
  main()
