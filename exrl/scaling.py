"""ScaleRL compute-scaling fits: R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B) (arXiv 2510.13786).

A is the asymptotic score, B the efficiency exponent, C_mid the compute at half the gain, R0 the score at the
start. The fitting procedure follows the paper: drop the early points, fix R0 from the start of the run,
grid-search A and C_mid, fit B by least squares at each grid point, keep the lowest-SSE fit (here the best grid
point is then polished by a bounded local least-squares solve). Bootstrap intervals resample the residuals of the
fit (the compute locations of a run are fixed, its scores are noisy). The extrapolation check fits the points with
C <= C_max / 2 and reports the error on the rest.

Compute is whatever unit the caller counts in: FLOPs (`rl_step_flops` estimates them from the model size and
tokens) or accelerator-hours. Host-side numpy/scipy only.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import optimize


def sigmoid_curve(compute_N, A: float, B: float, C_mid: float, R0: float) -> np.ndarray:
  """R(C) for compute_N > 0 (any unit, the same as C_mid); float64[N]."""
  c = np.asarray(compute_N, np.float64)
  return R0 + (A - R0) / (1.0 + (C_mid / c) ** B)


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """Grid and exclusion settings; the defaults suit scores in [0, 1] (pass rates)."""
  exclude_frac: float = 0.05  # drop points with C < exclude_frac * C_max (the paper drops about the first epoch)
  min_compute: float | None = None  # absolute cut-off instead of exclude_frac
  r0: float | None = None  # None: mean score of the first `r0_points` points (before exclusion)
  r0_points: int = 3
  a_max: float | None = 1.0  # upper end of the A grid; None: max(score) + its range
  grid_a: int = 41
  grid_cmid: int = 41
  grid_b: int = 61
  b_range: tuple[float, float] = (0.05, 20.0)
  cmid_span: float = 10.0  # C_mid grid spans [C_min / span, C_max * span] (log-spaced)
  polish: bool = True

  def __post_init__(self):
    if not 0 <= self.exclude_frac < 1:
      raise ValueError(f"FitConfig.exclude_frac={self.exclude_frac}; valid: 0 <= exclude_frac < 1")
    if min(self.grid_a, self.grid_cmid, self.grid_b) < 3:
      raise ValueError(f"grid sizes ({self.grid_a}, {self.grid_cmid}, {self.grid_b}) must each be >= 3")
    if not 0 < self.b_range[0] < self.b_range[1]:
      raise ValueError(f"FitConfig.b_range={self.b_range}; valid: 0 < low < high")


@dataclasses.dataclass(frozen=True)
class Fit:
  A: float
  B: float
  C_mid: float
  R0: float
  sse: float
  n: int  # points used

  def predict(self, compute_N) -> np.ndarray:
    return sigmoid_curve(compute_N, self.A, self.B, self.C_mid, self.R0)

  def params(self) -> dict:
    return {"A": self.A, "B": self.B, "C_mid": self.C_mid, "R0": self.R0}


def _check_xy(compute_N, score_N) -> tuple[np.ndarray, np.ndarray]:
  c = np.asarray(compute_N, np.float64).reshape(-1)
  y = np.asarray(score_N, np.float64).reshape(-1)
  if c.shape != y.shape:
    raise ValueError(f"compute has {c.size} values and score has {y.size}; they must pair up")
  if not (np.all(np.isfinite(c)) and np.all(np.isfinite(y))):
    raise ValueError("compute and score must be finite (found NaN/inf)")
  if np.any(c <= 0):
    raise ValueError(f"compute must be > 0 (smallest is {c.min()}); the curve is defined for C > 0")
  order = np.argsort(c, kind="stable")
  return c[order], y[order]


def _grid_fit(c, y, r0, a_grid, cmid_grid, b_grid) -> tuple[float, float, float, float]:
  """Lowest-SSE (A, B, C_mid) over the grid: for each (A, C_mid), the best B; returns (A, B, C_mid, sse)."""
  # ratio_MxBxN = (C_mid / C)^B, computed once and reused for every A.
  log_ratio = np.log(cmid_grid)[:, None, None] - np.log(c)[None, None, :]
  frac_MxBxN = 1.0 / (1.0 + np.exp(np.clip(b_grid[None, :, None] * log_ratio, -700, 700)))
  best = (math.inf, 0, 0, 0)
  for ia, a in enumerate(a_grid):
    sse_MxB = np.sum((r0 + (a - r0) * frac_MxBxN - y) ** 2, axis=-1)
    idx = np.unravel_index(np.argmin(sse_MxB), sse_MxB.shape)
    if sse_MxB[idx] < best[0]:
      best = (float(sse_MxB[idx]), ia, idx[0], idx[1])
  sse, ia, im, ib = best
  return float(a_grid[ia]), float(b_grid[ib]), float(cmid_grid[im]), sse


def _polish(c, y, r0, start, bounds) -> tuple[float, float, float, float]:
  """Local bounded least squares in (A, log B, log C_mid) from the grid optimum."""
  a0, b0, m0 = start
  (alo, ahi), (blo, bhi), (mlo, mhi) = bounds
  resid = lambda p: sigmoid_curve(c, p[0], math.exp(p[1]), math.exp(p[2]), r0) - y
  x0 = np.array([a0, math.log(b0), math.log(m0)])
  lo = np.array([alo, math.log(blo), math.log(mlo)])
  hi = np.array([ahi, math.log(bhi), math.log(mhi)])
  sol = optimize.least_squares(resid, np.clip(x0, lo, hi), bounds=(lo, hi), method="trf")
  return float(sol.x[0]), float(math.exp(sol.x[1])), float(math.exp(sol.x[2])), float(np.sum(sol.fun ** 2))


def fit_sigmoid(compute_N, score_N, cfg: FitConfig = FitConfig()) -> Fit:
  """Fit A, B, C_mid (R0 fixed from the start of the run or cfg.r0) by the paper's grid procedure."""
  c, y = _check_xy(compute_N, score_N)
  r0 = cfg.r0 if cfg.r0 is not None else float(np.mean(y[:max(1, cfg.r0_points)]))
  cut = cfg.min_compute if cfg.min_compute is not None else cfg.exclude_frac * c.max()
  keep = c >= cut
  c, y = c[keep], y[keep]
  if c.size < 4:
    raise ValueError(f"only {c.size} points have compute >= {cut:g}; a 3-parameter fit needs at least 4 "
                     f"(lower exclude_frac / min_compute or log more steps)")
  return _fit_points(c, y, r0, cfg)


def _fit_points(c, y, r0, cfg: FitConfig) -> Fit:
  span = float(np.max(y) - np.min(y)) or 1.0
  a_lo = float(np.min(y)) if np.max(y) >= r0 else float(np.min(y)) - span  # a rising curve has A >= its scores
  a_hi = cfg.a_max if cfg.a_max is not None else float(np.max(y)) + span
  a_hi = max(a_hi, float(np.max(y)))
  m_lo, m_hi = c.min() / cfg.cmid_span, c.max() * cfg.cmid_span
  b_lo, b_hi = cfg.b_range
  a_grid = np.linspace(a_lo, a_hi, cfg.grid_a)
  cmid_grid = np.geomspace(m_lo, m_hi, cfg.grid_cmid)
  b_grid = np.geomspace(b_lo, b_hi, cfg.grid_b)
  A, B, C_mid, sse = _grid_fit(c, y, r0, a_grid, cmid_grid, b_grid)
  if cfg.polish:
    A2, B2, M2, sse2 = _polish(c, y, r0, (A, B, C_mid), ((a_lo, a_hi), (b_lo, b_hi), (m_lo, m_hi)))
    if sse2 <= sse:
      A, B, C_mid, sse = A2, B2, M2, sse2
  return Fit(A=A, B=B, C_mid=C_mid, R0=r0, sse=sse, n=int(c.size))


def bootstrap(compute_N, score_N, fit: Fit, cfg: FitConfig = FitConfig(), *, n_boot: int = 100, seed: int = 0,
              level: float = 0.95) -> dict[str, tuple[float, float]]:
  """Residual-bootstrap percentile intervals for A, B, C_mid: {name: (low, high)}.

  Each replicate adds resampled residuals of `fit` to its prediction at the same compute points and refits
  on a coarser grid (the polish step recovers the precision).
  """
  c, y = _check_xy(compute_N, score_N)
  cut = cfg.min_compute if cfg.min_compute is not None else cfg.exclude_frac * c.max()
  c, y = c[c >= cut], y[c >= cut]
  pred = fit.predict(c)
  resid = y - pred
  rng = np.random.default_rng(seed)
  coarse = dataclasses.replace(cfg, grid_a=max(3, cfg.grid_a // 2), grid_cmid=max(3, cfg.grid_cmid // 2),
                               grid_b=max(3, cfg.grid_b // 2))
  draws = []
  for _ in range(n_boot):
    y_b = pred + rng.choice(resid, size=resid.size, replace=True)
    f = _fit_points(c, y_b, fit.R0, coarse)
    draws.append((f.A, f.B, f.C_mid))
  draws = np.asarray(draws)
  q = (1 - level) / 2
  lo, hi = np.quantile(draws, q, axis=0), np.quantile(draws, 1 - q, axis=0)
  return {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(("A", "B", "C_mid"))}


def extrapolation_error(compute_N, score_N, cfg: FitConfig = FitConfig()) -> dict:
  """Fit the points with C <= C_max / 2, predict the rest: RMSE, max |error|, and the half-fit's parameters."""
  c, y = _check_xy(compute_N, score_N)
  r0 = cfg.r0 if cfg.r0 is not None else float(np.mean(y[:max(1, cfg.r0_points)]))
  half = c.max() / 2
  first = _check_min_points(c <= half, "the first half of compute")
  second = _check_min_points(c > half, "the second half of compute", need=1)
  fit = fit_sigmoid(c[first], y[first], dataclasses.replace(cfg, r0=r0, min_compute=cfg.min_compute if
                                                              cfg.min_compute is not None else cfg.exclude_frac * c.max()))
  err = fit.predict(c[second]) - y[second]
  return {"rmse": float(np.sqrt(np.mean(err ** 2))), "max_abs": float(np.max(np.abs(err))),
          "mean": float(np.mean(err)), "n_test": int(second.sum()), "fit_first_half": fit.params()}


def _check_min_points(mask, what: str, need: int = 4):
  if mask.sum() < need:
    raise ValueError(f"{what} has {int(mask.sum())} points; the extrapolation check needs at least {need}")
  return mask


# ---- compute accounting ----

def rl_step_flops(num_params: int, sampled_tokens: float, trained_tokens: float, inner_epochs: int = 1) -> float:
  """FLOPs of one RL step: 2N per sampled token (forward) + 2N per scoring token + 6N per trained token per epoch.

  The scoring pass (old/ref log-probs) is one forward over the trained tokens; attention FLOPs are ignored
  (the usual 6N rule, Kaplan et al.), which undercounts long contexts.
  """
  n = float(num_params)
  return 2 * n * sampled_tokens + 2 * n * trained_tokens + 6 * n * trained_tokens * inner_epochs


def compute_from_metrics(records: Sequence[dict], *, score_key: str, num_params: int | None = None,
                         rows_per_step: int | None = None, prompt_tokens: float = 0.0, inner_epochs: int = 1,
                         device_count: int | None = None, unit: str = "flops") -> tuple[np.ndarray, np.ndarray]:
  """(cumulative compute_N, score_N) from metrics.jsonl records (`exrl.infra.metrics.read_jsonl`).

  unit="flops": per step, rl_step_flops(num_params, rows * response_len, rows * (prompt + response_len)).
  unit="device_hours": cumulative timing.step_s * device_count / 3600.
  """
  if not records:
    raise ValueError("no metrics records to fit")
  steps = [r for r in records if score_key in r.get("metrics", {})]
  if not steps:
    keys = sorted({k for r in records for k in r.get("metrics", {})})
    raise ValueError(f"score key {score_key!r} is in no record; keys present: {keys}")
  score = np.array([r["metrics"][score_key] for r in steps], np.float64)
  if unit == "flops":
    if not num_params or not rows_per_step:
      raise ValueError("unit='flops' needs num_params and rows_per_step (prompts_per_step * group_size)")
    lens = np.array([r["metrics"].get("response_len", 0.0) for r in steps], np.float64)
    per = [rl_step_flops(num_params, rows_per_step * L, rows_per_step * (prompt_tokens + L), inner_epochs) for L in lens]
    compute = np.cumsum(per)
  elif unit == "device_hours":
    if not device_count:
      raise ValueError("unit='device_hours' needs device_count")
    secs = np.array([r.get("timing", {}).get("step_s", math.nan) for r in steps], np.float64)
    if not np.all(np.isfinite(secs)):
      raise ValueError("unit='device_hours' needs timing.step_s in every record")
    compute = np.cumsum(secs) * device_count / 3600.0
  else:
    raise ValueError(f"unit={unit!r}; valid: 'flops', 'device_hours'")
  return compute, score


def read_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
  """(compute, score) from a CSV with a header naming `score` and one of `compute`, `flops`, `gpu_hours`."""
  import csv
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    fields = [h.strip() for h in (reader.fieldnames or [])]
    ckey = next((k for k in ("compute", "flops", "gpu_hours") if k in fields), None)
    if ckey is None or "score" not in fields:
      raise ValueError(f"{path}: header {fields} needs a 'score' column and one of 'compute', 'flops', 'gpu_hours'")
    c, y = [], []
    for i, row in enumerate(reader, start=2):
      row = {k.strip(): v for k, v in row.items() if k}
      try:
        c.append(float(row[ckey]))
        y.append(float(row["score"]))
      except (TypeError, ValueError):
        raise ValueError(f"{path}:{i}: not a number in {ckey}={row.get(ckey)!r} / score={row.get('score')!r}") from None
  return np.array(c), np.array(y)


def plot_fit(compute_N, score_N, fit: Fit, path: str | Path, *, half_fit: dict | None = None,
             xlabel: str = "compute") -> None:
  """PNG: the points, the fitted curve out to 4x the data, the asymptote, and optionally the half-compute fit."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  c, y = _check_xy(compute_N, score_N)
  xs = np.geomspace(c.min(), c.max() * 4, 300)
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.scatter(c, y, s=8, alpha=0.5, label="measured")
  ax.plot(xs, fit.predict(xs), "C1", label=f"fit A={fit.A:.3f} B={fit.B:.2f} C_mid={fit.C_mid:.3g}")
  ax.axhline(fit.A, color="C1", ls=":", lw=1)
  if half_fit:
    ax.plot(xs, sigmoid_curve(xs, **half_fit), "C2--", label="fit on first half of compute")
    ax.axvline(c.max() / 2, color="gray", ls=":", lw=1)
  ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel("score")
  ax.legend(fontsize=8)
  fig.tight_layout()
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def fit_report(compute_N, score_N, cfg: FitConfig = FitConfig(), *, n_boot: int = 100, seed: int = 0) -> dict:
  """The full report: A, B, C_mid, R0, SSE, 95% bootstrap intervals and the extrapolation check."""
  fit = fit_sigmoid(compute_N, score_N, cfg)
  out = {**fit.params(), "sse": fit.sse, "n_points": fit.n}
  out["ci95"] = bootstrap(compute_N, score_N, fit, cfg, n_boot=n_boot, seed=seed) if n_boot else {}
  try:
    out["extrapolation"] = extrapolation_error(compute_N, score_N, cfg)
  except ValueError as e:  # too few points in one half: report why instead of failing the whole fit
    out["extrapolation"] = {"error": str(e)}
  return json.loads(json.dumps(out))
