"""Intuitor where its mechanism can work: a base with written multi-step reasoning to sharpen, RL on one family at
a paper-like relative learning rate, and evaluation in domain and on families RL never trains on.

  python -m experiments.intuitor_regime                      # seed 0
  python -m experiments.intuitor_regime --seeds 0 1 2        # the 3-seed table in docs/results/intuitor.md

Per seed:
  1. the base: a tiny Qwen2-style decoder SFT-trained for `sft.steps` on a broad mix of scratchpad arithmetic
     (`SFT_MIX`: chains of 3-5 two-digit terms with + and -, written as running totals, "47+15-92=" ->
     "47+15=62,62-92=-30. answer: -30"; 3-term chains of three-digit numbers; digit sums of 6-digit numbers),
     so it has written multi-step reasoning that sampling at T=1 gets wrong more often than greedy decoding;
  2. RL arms (`--arms`, names from experiments.intuitor_ablations.ARMS) on the in-domain family only (4-term
     two-digit chains), at lr `rl.optim.lr` = 1/100 of the SFT peak rate (the paper: 3e-6 on a 3B model
     pretrained near 3e-4), 32 prompts x 8 samples per step (the paper: 128 x 7), 60 steps (the paper: 58),
     KL beta 0.005, T = 1;
  3. every model on held-out problems of the in-domain family and of two families RL never trains on but the
     base knows from SFT (as the paper's code benchmarks are known to Qwen from pretraining): 5-term chains
     (longer) and 3-digit chains (bigger numbers); pass@1 at T=1 and greedy, 95% Wilson intervals;
  4. a probe of what each policy answers (`exrl.train.evaluate.answer_probe`: distinct answers per problem over
     8 samples, the share of the 3 most common answers, self-certainty and entropy per token).
Across seeds: Wilson intervals on the pooled samples, and each arm's pass@1 minus the base's, paired by seed,
with a Student-t interval over the seeds. Re-running the same command resumes: finished arms are read back
from their run folders.

The last stdout line is the JSON result, also written to runs/intuitor_regime/results.json; the tables go to
table.md, the curves to curves_seed*.png and the per-arm accuracies to accuracy.png.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import scipy.stats
import tyro

from experiments import common
from experiments.intuitor_ablations import ARMS, CURVES, arm_rl
from exrl import cli
from exrl.curriculum.source import TaskSource
from exrl.rl.losses import LossConfig
from exrl.rollout.sampler import SamplingConfig
from exrl.tasks import get_task
from exrl.tasks.math_data import extract_answer
from exrl.train.evaluate import EvalConfig, answer_probe, evaluate, wilson_interval
from exrl.infra import runlock
from exrl.infra.metrics import read_jsonl
from exrl.infra.plot import plot_runs
from exrl.train.rl_loop import RLConfig, train_rl
from exrl.train.sft import SFTConfig, train_sft
from exrl.train.state import OptimConfig

SFT_MIX = (("chain_sum", {"num_terms": 3, "digits": 2, "ops": "+-"}), ("chain_sum", {"num_terms": 4, "digits": 2, "ops": "+-"}),
           ("chain_sum", {"num_terms": 5, "digits": 2, "ops": "+-"}), ("chain_sum", {"num_terms": 3, "digits": 3, "ops": "+-"}),
           ("digit_sum", {"digits": 6}))
IN_DOMAIN = ("chain_sum", {"num_terms": 4, "digits": 2, "ops": "+-"})
OOD = {"chain5": ("chain_sum", {"num_terms": 5, "digits": 2, "ops": "+-"}),
       "3digit": ("chain_sum", {"num_terms": 3, "digits": 3, "ops": "+-"})}
SPLITS = ("in", *OOD)


@dataclasses.dataclass(frozen=True)
class Config:
  run_dir: str = "runs/intuitor_regime"
  seeds: tuple[int, ...] = (0,)
  arms: tuple[str, ...] = ("grpo", "intuitor", "entropy", "majority", "noise")
  model: common.TinyModel = common.TinyModel()
  sft_examples_per_family: int = 8000
  sft: SFTConfig = SFTConfig(steps=1200, batch_size=64, max_len=96, checkpoint_every=600,
                             optim=OptimConfig(lr=1e-3, warmup_frac=0.05, min_lr_ratio=0.1))
  rl: RLConfig = RLConfig(
      steps=60, prompts_per_step=32, group_size=8, checkpoint_every=30,
      sampling=SamplingConfig(max_new_tokens=64, temperature=1.0), loss=LossConfig(kl_beta=0.005),
      optim=OptimConfig(lr=1e-5, warmup_frac=0.1, min_lr_ratio=0.1),
      eval=EvalConfig(batch_size=256, sampling=SamplingConfig(max_new_tokens=64, temperature=1.0)))
  eval_problems: int = 300
  probe_problems: int = 64
  probe_samples: int = 8

  def __post_init__(self):
    bad = sorted(set(self.arms) - set(ARMS))
    if bad:
      raise ValueError(f"unknown arms {bad}; valid: {sorted(ARMS)}")
    if not self.seeds:
      raise ValueError("--seeds is empty; give at least one seed")
    for name in ("eval_problems", "probe_problems", "probe_samples", "sft_examples_per_family"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}; must be >= 1")


def _task(spec):
  name, kw = spec
  return get_task(name, **kw)


def _assess(cfg: Config, model_config, params, tokenizer, problems: dict, seed: int) -> dict:
  """Eval on every split plus the answer probe on the in-domain problems."""
  eval_cfg = dataclasses.replace(cfg.rl.eval, seed=seed + 1)
  out = {split: common.compact(evaluate(model_config, params, tokenizer, probs, None, eval_cfg))
         for split, probs in problems.items()}
  out["probe"] = answer_probe(model_config, params, tokenizer, problems["in"][:cfg.probe_problems], extract_answer,
                              cfg.rl.sampling, samples=cfg.probe_samples, seed=seed + 2)
  return out


def run_seed(cfg: Config, seed: int, tokenizer) -> dict:
  run_dir = Path(cfg.run_dir) / f"seed{seed}"
  done_file = lambda name: run_dir / name / "assessment.json"
  in_task = _task(IN_DOMAIN)
  problems = {"in": in_task.generate(cfg.eval_problems, seed=seed, split="eval"),
              **{k: _task(spec).generate(cfg.eval_problems, seed=seed, split="eval") for k, spec in OOD.items()}}
  model_config, params = common.init_model(cfg.model, tokenizer, seed)
  pairs = [pair for spec in SFT_MIX for pair in common.sft_pairs(_task(spec), cfg.sft_examples_per_family, seed)]
  np.random.default_rng(seed).shuffle(pairs)
  t0 = time.time()
  print(f"[regime] seed {seed}: SFT base on {len(pairs)} examples of {len(SFT_MIX)} families", flush=True)
  sft = dataclasses.replace(cfg.sft, run_dir=str(run_dir / "sft"), seed=seed)
  base = train_sft(sft, model_config, params, tokenizer, pairs).params
  out = {}
  for name in ("base", *cfg.arms):
    if done_file(name).exists():
      out[name] = json.loads(done_file(name).read_text())
      print(f"[regime] seed {seed}: {name} read back from {done_file(name)}", flush=True)
      continue
    if name == "base":
      result, params_arm = {}, base
    else:
      print(f"[regime] seed {seed}: RL arm {name!r} (reward={ARMS[name][0]})", flush=True)
      t0 = time.time()
      rl = dataclasses.replace(cfg.rl, run_dir=str(run_dir / name), seed=seed,
                               eval=dataclasses.replace(cfg.rl.eval, seed=seed + 1))
      state, _ = train_rl(arm_rl(rl, name), model_config, base, tokenizer, TaskSource(in_task, seed=seed))
      rows = read_jsonl(run_dir / name / "metrics.jsonl")
      mean = lambda rs, k: float(np.mean([r["metrics"][k] for r in rs]))
      result = {"train_last10": {k: mean(rows[-10:], k) for k in ("accuracy", "self_certainty_reward",
                                                                  "response_len", "kl", "sample_entropy")},
                "sc_acc_corr_first10": mean(rows[:10], "sc_acc_corr")}
      params_arm = state.params
    print(f"[regime] seed {seed}: evaluating {name}", flush=True)
    result.update(_assess(cfg, model_config, params_arm, tokenizer, problems, seed), seed=seed,
                  time_s=round(time.time() - t0, 1))  # base: SFT + eval; an arm: its RL + eval
    done_file(name).parent.mkdir(parents=True, exist_ok=True)
    done_file(name).write_text(json.dumps(result, indent=2))
    out[name] = result
  if cfg.arms:
    plot_runs({arm: run_dir / arm for arm in cfg.arms}, CURVES, Path(cfg.run_dir) / f"curves_seed{seed}.png")
  return out


def summarise(per_seed: list[dict], names: list[str]) -> dict:
  """Pooled Wilson intervals per (model, split, metric), and pass@1 minus the base's paired by seed."""
  out = {}
  for name in names:
    s = {}
    for split in SPLITS:
      for key in ("pass1", "greedy"):
        cells = [r[name][split] for r in per_seed]
        hits, n = sum(c[key] * c["n"] for c in cells), sum(c["n"] for c in cells)
        s[f"{split}_{key}"] = {"mean": hits / n, "ci95": list(wilson_interval(hits, n)), "n": n,
                               "per_seed": [c[key] for c in cells]}
      d = np.array([r[name][split]["pass1"] - r["base"][split]["pass1"] for r in per_seed])
      half = scipy.stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else None
      s[f"{split}_pass1_minus_base"] = {"mean": float(d.mean()), "ci95": None if half is None else
                                        [float(d.mean() - half), float(d.mean() + half)]}
    for k in ("self_certainty", "entropy", "distinct_per_problem", "top3_share"):
      s[f"probe_{k}"] = float(np.mean([r[name]["probe"][k] for r in per_seed]))
    s["len_in"] = float(np.mean([r[name]["in"]["mean_len"] for r in per_seed]))
    if name != "base":
      s["sc_acc_corr_first10"] = float(np.mean([r[name]["sc_acc_corr_first10"] for r in per_seed]))
      s["kl_last10"] = float(np.mean([r[name]["train_last10"]["kl"] for r in per_seed]))
    out[name] = s
  return out


def tables(summary: dict, per_seed: list[dict], seeds) -> str:
  f = lambda d: f"{d['mean']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"
  fd = lambda d: f"{d['mean']:+.3f}" + ("" if d["ci95"] is None else f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
  lines = ["| model | in-domain pass@1 | in-domain greedy | chain5 pass@1 | 3digit pass@1 | len | SC | "
           "distinct / problem | top-3 share |", "|---|---|---|---|---|---|---|---|---|"]
  for name, s in summary.items():
    lines.append(f"| {name} | {f(s['in_pass1'])} | {f(s['in_greedy'])} | {f(s['chain5_pass1'])} | "
                 f"{f(s['3digit_pass1'])} | {s['len_in']:.1f} | {s['probe_self_certainty']:.2f} | "
                 f"{s['probe_distinct_per_problem']:.2f} | {s['probe_top3_share']:.2f} |")
  lines += ["", "pass@1 minus the base's, paired by seed (mean, 95% t-interval over seeds):", "",
            "| model | in-domain | chain5 | 3digit | sc_acc_corr (first 10 steps) | KL (last 10) |",
            "|---|---|---|---|---|---|"]
  for name, s in summary.items():
    if name != "base":
      lines.append(f"| {name} | {fd(s['in_pass1_minus_base'])} | {fd(s['chain5_pass1_minus_base'])} | "
                   f"{fd(s['3digit_pass1_minus_base'])} | {s['sc_acc_corr_first10']:+.2f} | {s['kl_last10']:.3f} |")
  lines += ["", "Per seed, pass@1 in-domain / chain5 / 3digit:", "", "| model | " + " | ".join(
      f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
  for name in summary:
    lines.append(f"| {name} | " + " | ".join(
        " / ".join(f"{r[name][split]['pass1']:.3f}" for split in SPLITS) for r in per_seed) + " |")
  return "\n".join(lines)


def plot_accuracy(summary: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(summary)
  fig, ax = plt.subplots(figsize=(8, 3.5))
  width = 0.8 / len(SPLITS)
  for i, split in enumerate(SPLITS):
    cells = [summary[n][f"{split}_pass1"] for n in names]
    mean = np.array([c["mean"] for c in cells])
    err = np.array([[m - c["ci95"][0], c["ci95"][1] - m] for m, c in zip(mean, cells)]).T
    ax.bar(np.arange(len(names)) + (i - (len(SPLITS) - 1) / 2) * width, mean, width, yerr=err, capsize=2, label=split)
  ax.set_xticks(np.arange(len(names)), names)
  ax.set_ylabel("pass@1 (T=1), pooled 95% CI")
  ax.legend(frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


@runlock.holding(lambda cfg: cfg.run_dir)  # one live launch per run dir, set-up to last write
def main(cfg: Config) -> dict:
  t0 = time.time()
  run_dir = Path(cfg.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  tasks = [_task(spec) for spec in SFT_MIX]
  tokenizer = common.build_tokenizer(tasks, run_dir, seed=0)  # one tokenizer for every seed
  per_seed = [run_seed(cfg, s, tokenizer) for s in cfg.seeds]
  names = ["base", *cfg.arms]
  summary = summarise(per_seed, names)
  text = tables(summary, per_seed, cfg.seeds)
  print(text, flush=True)
  (run_dir / "table.md").write_text(text + "\n")
  plot_accuracy(summary, run_dir / "accuracy.png")
  result = {"summary": summary, "seeds": list(cfg.seeds), "eval_problems_per_seed_and_split": cfg.eval_problems,
            "runtime_s": round(time.time() - t0, 1)}
  (run_dir / "per_seed.json").write_text(json.dumps(per_seed, indent=2))
  common.write_result(run_dir, result)
  return result


if __name__ == "__main__":
  cli.run(lambda: main(tyro.cli(Config)))
