"""Proof on an accelerator: one prepared command that measures exrl on a GPU or TPU well inside 8 minutes.

  python -m experiments.accelerator_report          # on the accelerator: writes runs/accelerator_report/
  python -m experiments.accelerator_report --tiny   # the same code paths on a tiny model on CPU (CI plumbing)

Sections, in order, each with its own time budget and every one under a global deadline (total_budget_s): a
section that would start past the deadline, or a measurement inside one that would, is recorded as skipped, and a
watchdog ends the process shortly after the deadline, so the run never overruns. result.json is rewritten after
every measurement, so a killed run keeps what it measured.
  env          device kind/count, versions, table peak bf16 FLOP/s vs a timed matmul, HBM bandwidth (timed copy)
  token_stats  N=8192, D=896, V=151936: materialised logits vs chunked XLA vs Pallas (max error, temp bytes,
               fwd+bwd s); on a GPU, whether pallas_gpu or chunked XLA should be the GPU default
  parity       a random Qwen2.5-0.5B-layout model: exrl logits vs transformers (torch on the same GPU), fp32 + bf16
  sampler      bf16, batch 64 and 256 x 512 new tokens: engines vs HF generate and vs the bandwidth roofline
  rl_step      one GRPO step, 64 x 512 new tokens, stage by stage; update MFU vs the table peak; compile seconds
Writes result.json and report.md to out_dir; the last stdout line is the result JSON. On CPU (--tiny) every number
is a plumbing check, not a performance figure.
"""
from __future__ import annotations

import os

# Torch shares the GPU in the parity and sampler sections: JAX must not pre-allocate 75% of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from experiments import accel_env, accel_kernels, accel_render  # noqa: E402
from experiments.accel_model import TINY_LAYOUT, Checkpoint, Layout, parity, sampler_section  # noqa: E402
from experiments import accel_rl_step  # noqa: E402

SECTIONS = ("env", "token_stats", "parity", "sampler", "rl_step")


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Every shape the report measures; REAL is the issue's, TINY runs the same paths on CPU in seconds."""
  layout: Layout = Layout()
  matmul_n: int = 8192
  copy_bytes: int = 1 << 30
  stats_shape: tuple[int, int, int] = (8192, 896, 151936)
  stats_dtype: str = "bfloat16"
  gpu_blocks: tuple[tuple[int, int, int, int], ...] = ((64, 128, 64, 4), (128, 128, 32, 8))  # (bn, bv, bd, warps)
  repeats: int = 3
  parity_batch: int = 2
  parity_len: int = 256
  sampler_batches: tuple[int, ...] = (64, 256)
  prompt_len: int = 64
  new_tokens: int = 512
  rl_prompts: int = 8
  rl_group: int = 8
  rl_micro: int = 4
  rl_repeats: int = 1
  budgets_s: tuple[tuple[str, float], ...] = (("env", 30), ("token_stats", 90), ("parity", 90), ("sampler", 120),
                                              ("rl_step", 150))


TINY = Sizes(layout=TINY_LAYOUT, matmul_n=256, copy_bytes=1 << 22, stats_shape=(48, 24, 300), stats_dtype="float32",
             gpu_blocks=((16, 128, 16, 4),), repeats=2, parity_batch=2, parity_len=16, sampler_batches=(4,),
             prompt_len=8, new_tokens=8, rl_prompts=2, rl_group=4, rl_micro=2, rl_repeats=1)


@dataclasses.dataclass(frozen=True)
class Config:
  tiny: bool = False  # the tiny model and shapes on CPU: a plumbing check of every section, not a measurement
  out_dir: str = "runs/accelerator_report"
  total_budget_s: float = 400.0  # global deadline; the watchdog exits at total_budget_s + grace_s (7 min)
  grace_s: float = 20.0
  sections: tuple[str, ...] = SECTIONS

  def __post_init__(self):
    bad = [s for s in self.sections if s not in SECTIONS]
    if bad:
      raise ValueError(f"unknown sections {bad}; valid: {SECTIONS}")
    if self.total_budget_s <= 0:
      raise ValueError(f"total_budget_s={self.total_budget_s} must be > 0")


class Recorder:
  """Holds the result and rewrites result.json (atomically) and report.md after every put."""

  def __init__(self, out_dir: Path, result: dict):
    self.out_dir, self.result, self.lock = out_dir, result, threading.Lock()
    out_dir.mkdir(parents=True, exist_ok=True)

  def put(self, section: str, key: str, value) -> None:
    with self.lock:
      self.result["sections"].setdefault(section, {})[key] = value
      self.flush()

  def flush(self) -> None:
    tmp = self.out_dir / "result.json.tmp"
    tmp.write_text(json.dumps(self.result, indent=2, default=float))
    tmp.replace(self.out_dir / "result.json")
    (self.out_dir / "report.md").write_text(accel_render.render(self.result))


class Run:
  """The state the sections share: sizes, the environment figures and the lazily built checkpoint."""

  def __init__(self, sizes: Sizes, rec: Recorder):
    self.sizes, self.rec, self.env, self._ckpt = sizes, rec, {}, None

  def checkpoint(self) -> Checkpoint:
    if self._ckpt is None:
      t0 = time.perf_counter()
      self._ckpt = Checkpoint(self.sizes.layout)
      with self.rec.lock:
        self.rec.result["checkpoint_build_s"] = time.perf_counter() - t0
        self.rec.flush()
    return self._ckpt


def section_env(run: Run, put, deadline):
  s = run.sizes
  put("device", accel_env.device_info())
  put("versions", accel_env.versions())
  mm = accel_env.timed_matmul(s.matmul_n, repeats=s.repeats)
  peak = run.rec.result["sections"]["env"]["device"]["peak_bf16_flops"]
  mm["fraction_of_table_peak"] = mm["flops_per_s"] / peak if peak else None
  put("matmul_bf16", mm)
  copy = accel_env.timed_copy(s.copy_bytes, repeats=s.repeats)
  spec = run.rec.result["sections"]["env"]["device"]["spec_hbm_bytes_per_s"]
  copy["fraction_of_spec"] = copy["bytes_per_s"] / spec if spec else None
  put("copy", copy)
  run.env.update(peak=peak, matmul_flops=mm["flops_per_s"], bandwidth=copy["bytes_per_s"])


def section_token_stats(run: Run, put, deadline):
  s = run.sizes
  accel_kernels.run(s.stats_shape, s.stats_dtype, s.repeats, s.gpu_blocks, run.sizes is TINY, put, deadline)


def section_parity(run: Run, put, deadline):
  parity(run.checkpoint(), run.sizes.parity_batch, run.sizes.parity_len, put)


def section_sampler(run: Run, put, deadline):
  s = run.sizes
  sampler_section(run.checkpoint(), s.sampler_batches, s.prompt_len, s.new_tokens, run.env.get("bandwidth"),
                  put, deadline)


def section_rl_step(run: Run, put, deadline):
  s = run.sizes
  accel_rl_step.run(run.checkpoint(), s.rl_prompts, s.rl_group, s.prompt_len, s.new_tokens, s.rl_micro,
                    s.rl_repeats, run.env.get("peak"), run.env.get("matmul_flops"), put, deadline)


RUNNERS = {"env": section_env, "token_stats": section_token_stats, "parity": section_parity,
           "sampler": section_sampler, "rl_step": section_rl_step}
MIN_START_S = 10.0  # a section is not started with less time than this left before the global deadline


def _watchdog(rec: Recorder, t_kill: float, current: list, done: threading.Event):
  if done.wait(max(t_kill - time.monotonic(), 0.0)):
    return  # main finished in time
  with rec.lock:
    rec.result["killed_by_watchdog"] = f"over the budget while running section {current[0]!r}"
    rec.flush()
  print(json.dumps(rec.result, default=float), flush=True)
  os._exit(3)


def main(cfg: Config) -> dict:
  t_start = time.monotonic()
  t_end = t_start + cfg.total_budget_s
  sizes = TINY if cfg.tiny else Sizes()
  result = {"command": "python -m experiments.accelerator_report" + (" --tiny" if cfg.tiny else ""),
            "tiny": cfg.tiny, "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "total_budget_s": cfg.total_budget_s, "sizes": dataclasses.asdict(sizes), "sections": {}}
  rec = Recorder(Path(cfg.out_dir), result)
  run, current = Run(sizes, rec), [None]
  done = threading.Event()
  threading.Thread(target=_watchdog, args=(rec, t_end + cfg.grace_s, current, done), daemon=True).start()
  try:
    _run_sections(cfg, run, rec, t_end, current)
  finally:
    done.set()
  with rec.lock:
    result["total_s"] = time.monotonic() - t_start
    rec.flush()
  print(json.dumps(result, default=float), flush=True)
  return result


def _run_sections(cfg: Config, run: Run, rec: Recorder, t_end: float, current: list) -> None:
  budgets = dict(run.sizes.budgets_s)
  for name in cfg.sections:
    now = time.monotonic()
    if t_end - now < MIN_START_S:
      rec.put(name, "status", f"skipped: {t_end - now:.0f} s left of the global budget")
      continue
    current[0] = name
    deadline = min(now + budgets[name], t_end)
    rec.put(name, "status", "running")
    put = lambda key, value, name=name: rec.put(name, key, value)
    try:
      RUNNERS[name](run, put, deadline)
      status = "ok"
    except Exception as e:  # one failing section must not cost the others their measurement
      status = f"error: {type(e).__name__}: {str(e)[:1500]}"
      rec.put(name, "traceback", traceback.format_exc()[-4000:])
    rec.put(name, "seconds", time.monotonic() - now)
    rec.put(name, "status", status)
    print(f"[accelerator_report] {name}: {status} ({time.monotonic() - now:.1f} s)", flush=True)
  current[0] = None


def parse(argv=None) -> Config:
  """tyro when installed; otherwise a plain argparse over the same fields (accelerator images may lack tyro)."""
  try:
    import tyro
  except ImportError:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Config):
      flag = "--" + f.name.replace("_", "-")
      if f.type in (bool, "bool"):
        p.add_argument(flag, action="store_true")
      elif f.name == "sections":
        p.add_argument(flag, nargs="+", default=list(f.default))
      else:
        p.add_argument(flag, type=type(f.default), default=f.default)
    ns = vars(p.parse_args(argv))
    return Config(**{**ns, "sections": tuple(ns["sections"])})
  return tyro.cli(Config, args=argv)


if __name__ == "__main__":
  main(parse())
