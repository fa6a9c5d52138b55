"""Intuitor's findings at small scale, over several seeds (arXiv 2505.19590).

  python -m experiments.intuitor_ablations

Per seed: SFT a tiny model on two-digit addition (the quickstart's base), then run RL arms from it
(`--arms`; the default four first):
  grpo              verifier reward (labels), KL β=0.005
  intuitor          self-certainty of the sampling policy (online), β=0.005
  intuitor_offline  self-certainty scored by the frozen base model (offline annotator), β=0.005
  intuitor_beta0    online self-certainty with no KL penalty (β=0)
  noise, shuffled   controls: i.i.d. N(0,1) rewards; self-certainty permuted within each group
  intuitor_lr_low   Intuitor at lr/10 for twice the steps (closer to the paper's relative step size)
  noise_lr_low      the noise control at the same lr/10 for twice the steps
  intuitor_lr3x, noise_lr3x, intuitor_lr10x, noise_lr10x   Intuitor and the noise control at 3x / 10x lr
  entropy, majority other label-free rewards: negative token entropy (RENT), group majority vote (TTRL)
Each model is evaluated in-domain (held-out two-digit additions) and out-of-domain on a held-out
family (three-operand sums such as "12+34+56=", never seen in SFT or RL). Reported: pass@1 at T=1 and
greedy accuracy with 95% Wilson intervals pooled over seeds, per-seed values, response length, and
the self-certainty / accuracy / length / KL curves over steps (PNG). The claims checked:
  1. GRPO and Intuitor both beat the base, in and out of domain;
  2. the offline annotator gets hacked (length up, accuracy down), the online one does not;
  3. β=0 collapses (length shrinks, accuracy falls).

Runtime on 2 CPU cores: 21 min (3 seeds; measured while other jobs shared the machine).
Result (400 held-out problems per seed, pooled 95% Wilson CIs; details in docs/results/intuitor.md):
  in-domain pass@1: base 0.307 [0.282, 0.334], grpo 0.333 [0.307, 0.361], intuitor 0.003,
  intuitor_offline 0.001, intuitor_beta0 0.005; OOD (three-operand sums) <= 0.004 for every model.
The last stdout line is the JSON result, also written to runs/intuitor_ablations/results.json.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import tyro

from experiments import common, quickstart
from exrl import cli
from exrl.curriculum.source import TaskSource
from exrl.tasks import get_task
from exrl.train.evaluate import evaluate, wilson_interval
from exrl.infra import runlock
from exrl.infra.metrics import read_jsonl
from exrl.infra.plot import plot_runs
from exrl.train.rl_loop import RLConfig, train_rl
from exrl.train.sft import train_sft

ARMS = {  # name: (reward, annotator, kl_beta or None for the default, lr scale, steps scale)
    "grpo": ("verifier", "online", None, 1.0, 1),
    "intuitor": ("self_certainty", "online", None, 1.0, 1),
    "intuitor_offline": ("self_certainty", "offline", None, 1.0, 1),
    "intuitor_beta0": ("self_certainty", "online", 0.0, 1.0, 1),
    # Controls: does self-certainty itself drive the collapse, or would any unit-size group-normalised signal?
    "noise": ("noise", "online", None, 1.0, 1),
    "shuffled": ("shuffled", "online", None, 1.0, 1),
    # A paper-like relative step size: lr / 10 for twice the steps.
    "intuitor_lr_low": ("self_certainty", "online", None, 0.1, 2),
    "noise_lr_low": ("noise", "online", None, 0.1, 2),
    # Learning-rate sweep upwards (experiments.intuitor_regime, whose base rate is 1/100 of SFT's): does
    # self-certainty beat a noise reward at the same step size?
    "intuitor_lr3x": ("self_certainty", "online", None, 3.0, 1),
    "noise_lr3x": ("noise", "online", None, 3.0, 1),
    "intuitor_lr10x": ("self_certainty", "online", None, 10.0, 1),
    "noise_lr10x": ("noise", "online", None, 10.0, 1),
    # Other label-free rewards on equal terms.
    "entropy": ("entropy", "online", None, 1.0, 1),
    "majority": ("majority", "online", None, 1.0, 1),
}
CURVES = ["accuracy", "self_certainty_reward", "response_len", "kl", "entropy", "sc_acc_corr"]


@dataclasses.dataclass(frozen=True)
class Config:
  run_dir: str = "runs/intuitor_ablations"
  seeds: tuple[int, ...] = (0, 1, 2)
  base: quickstart.Config = quickstart.Config(eval_problems=400,
                                              rl=dataclasses.replace(quickstart.Config.rl, steps=100, checkpoint_every=50))
  arms: tuple[str, ...] = ("grpo", "intuitor", "intuitor_offline", "intuitor_beta0")

  def __post_init__(self):
    bad = sorted(set(self.arms) - set(ARMS))
    if bad:
      raise ValueError(f"unknown arms {bad}; valid: {sorted(ARMS)}")


def arm_rl(rl: RLConfig, arm: str) -> RLConfig:
  """`rl` with arm `arm`'s reward, annotator and KL, and its learning-rate and step scales (`ARMS`)."""
  reward, annotator, beta, lr_scale, steps_scale = ARMS[arm]
  return dataclasses.replace(rl, reward=reward, sc_annotator=annotator, steps=rl.steps * steps_scale,
                             checkpoint_every=rl.checkpoint_every * steps_scale,
                             optim=dataclasses.replace(rl.optim, lr=rl.optim.lr * lr_scale),
                             loss=dataclasses.replace(rl.loss, kl_beta=rl.loss.kl_beta if beta is None else beta))


def _eval(model_config, params, tokenizer, task, problems, cfg: quickstart.Config, seed: int) -> dict:
  ev = evaluate(model_config, params, tokenizer, problems, task.verify, dataclasses.replace(cfg.rl.eval, seed=seed + 1))
  return common.compact(ev)


def run_seed(cfg: Config, seed: int) -> dict:
  qs = dataclasses.replace(cfg.base, seed=seed, run_dir=str(Path(cfg.run_dir) / f"seed{seed}"))
  run_dir = Path(qs.run_dir)
  task = quickstart.task_for(qs)
  ood_task = get_task("arithmetic", digits=2, num_ops=2, ops="+")
  tokenizer = common.build_tokenizer([task], Path(cfg.run_dir), seed=0)  # one tokenizer for all seeds
  model_config, params = common.init_model(qs.model, tokenizer, seed)
  in_problems = task.generate(qs.eval_problems, seed=seed, split="eval")
  ood_problems = ood_task.generate(qs.eval_problems, seed=seed, split="eval")
  sft = dataclasses.replace(qs.sft, run_dir=str(run_dir / "sft"), seed=seed)
  base = train_sft(sft, model_config, params, tokenizer, common.sft_pairs(task, qs.sft_examples, seed)).params
  out = {"base": {"in": _eval(model_config, base, tokenizer, task, in_problems, qs, seed),
                  "ood": _eval(model_config, base, tokenizer, ood_task, ood_problems, qs, seed)}}
  for arm in cfg.arms:
    rl = arm_rl(quickstart.rl_config(qs, arm, ARMS[arm][0]), arm)
    print(f"[ablations] seed {seed}: arm {arm}", flush=True)
    state, ev = train_rl(rl, model_config, base, tokenizer, TaskSource(task, seed=seed), eval_problems=in_problems,
                         verify=task.verify)
    rows = read_jsonl(run_dir / arm / "metrics.jsonl")
    last = lambda k: float(np.mean([r["metrics"][k] for r in rows[-10:]]))
    out[arm] = {"in": common.compact(ev),
                "ood": _eval(model_config, state.params, tokenizer, ood_task, ood_problems, qs, seed),
                "train_last10": {k: last(k) for k in ("accuracy", "self_certainty_reward", "response_len", "kl")},
                "sc_acc_corr_first10": float(np.mean([r["metrics"]["sc_acc_corr"] for r in rows[:10]]))}
  return out


def pooled(per_seed: list[dict], arm: str, split: str, key: str) -> dict:
  """Mean over seeds, the per-seed values, and a Wilson interval on all samples pooled."""
  vals = [s[arm][split][key] for s in per_seed]
  n = sum(s[arm][split]["n"] for s in per_seed)
  hits = sum(s[arm][split][key] * s[arm][split]["n"] for s in per_seed)
  return {"mean": float(np.mean(vals)), "per_seed": vals, "ci95": list(wilson_interval(hits, n)), "n": n}


@runlock.holding(lambda cfg: cfg.run_dir)  # one live launch per run dir, set-up to last write
def main(cfg: Config) -> dict:
  t0 = time.time()
  run_dir = Path(cfg.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  per_seed = [run_seed(cfg, s) for s in cfg.seeds]
  names = ["base", *cfg.arms]
  summary = {name: {f"{split}_{key}": pooled(per_seed, name, split, key) for split in ("in", "ood")
                    for key in ("pass1", "greedy")} for name in names}
  for name in names:
    summary[name]["len_in"] = float(np.mean([s[name]["in"]["mean_len"] for s in per_seed]))
  for arm in cfg.arms:
    summary[arm]["train_last10"] = {k: float(np.mean([s[arm]["train_last10"][k] for s in per_seed]))
                                    for k in per_seed[0][arm]["train_last10"]}
    summary[arm]["sc_acc_corr_first10"] = float(np.mean([s[arm]["sc_acc_corr_first10"] for s in per_seed]))
  lines = ["| model | in-domain pass@1 | in-domain greedy | OOD pass@1 | OOD greedy | len |", "|---|---|---|---|---|---|"]
  f = lambda d: f"{d['mean']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"
  for name in names:
    s = summary[name]
    lines.append(f"| {name} | {f(s['in_pass1'])} | {f(s['in_greedy'])} | {f(s['ood_pass1'])} | {f(s['ood_greedy'])} "
                 f"| {s['len_in']:.2f} |")
  print("\n".join(lines), flush=True)
  (run_dir / "table.md").write_text("\n".join(lines) + "\n")
  for seed in cfg.seeds:
    plot_runs({arm: run_dir / f"seed{seed}" / arm for arm in cfg.arms}, CURVES, run_dir / f"curves_seed{seed}.png")
  result = {"summary": summary, "seeds": list(cfg.seeds), "eval_problems_per_seed": cfg.base.eval_problems,
            "runtime_s": round(time.time() - t0, 1)}
  (run_dir / "per_seed.json").write_text(json.dumps(per_seed, indent=2))
  common.write_result(run_dir, result)
  return result


if __name__ == "__main__":
  cli.run(lambda: main(tyro.cli(Config)))
