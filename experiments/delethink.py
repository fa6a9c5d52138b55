"""Delethink vs LongCoT RL on a long-reasoning task, evaluated at thinking budgets beyond training (arXiv 2510.06557).

  python -m experiments.delethink

1. a SentencePiece tokenizer and a tiny Qwen2-style decoder; SFT on full written solutions of running_sum
   ("13:1:94," -> "12:1:95,11:1:96,...,00:1:07. answer: 07", 8 tokens a step) with 2-18 steps, plus the
   Delethink chunks (query + carryover -> next C - m tokens, `markov.chunk_examples`) of written traces of
   19-75 steps:
   the base. Like the paper's R1-Distill, which thinks Markovianly zero-shot, it can continue a trace from a
   carryover; it has never seen a context longer than the training budget;
2. from that base, two RL arms with the same token budget per trace (C + (I-1)(C-m) = 150 tokens):
     longcot    one context of 150 new tokens (GroupCollector)
     delethink  chunks of C = 50 with carryover m = 25 (the first h = 5 response tokens kept), I = 5 (MarkovCollector)
   both with the verifier reward on problems of 8-18 steps (18 steps fill the budget), no KL, clip 0.2/0.26,
   loss normalised per
   trace (seq_mean_token_mean), as the paper's recipe;
3. greedy accuracy of base, longcot and delethink on held-out problems of 10-60 steps, at budgets of 1x, 2x
   and 4x the training budget: LongCoT inference gets a longer context, Delethink inference more chunks.
   Delethink inference is also applied to the base and the LongCoT-trained model.

Chunk boundaries (50, then every 25 tokens) fall mid-step on purpose: the carryover starts inside a step.
Runtime and measured result: see docs/results/delethink.md. The last stdout line is the
JSON result, also written to runs/delethink/results.json, with the plots accuracy_vs_budget.png and curves.png.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
import tyro

from experiments import common
from exrl import cli
from exrl.curriculum.source import TaskSource
from exrl.rl.advantages import AdvantageConfig
from exrl.rl.losses import LossConfig
from exrl.rollout.markov import MarkovConfig, chunk_examples
from exrl.rollout.sampler import SamplingConfig
from exrl.tasks.running_sum import RunningSumTask
from exrl.train.collect.markov import MarkovCollector
from exrl.train.evaluate import generate_texts, wilson_interval
from exrl.infra import runlock
from exrl.infra.plot import plot_runs
from exrl.train.rl_loop import RLConfig, train_rl
from exrl.train.sft import SFTConfig, train_sft
from exrl.train.state import OptimConfig


@dataclasses.dataclass(frozen=True)
class Config:
  """The seeds and run dirs inside `sft` and `rl` are set per arm from these; `rl.sampling.max_new_tokens`
  is set to the chunking's budget, so both arms think for the same number of tokens."""
  run_dir: str = "runs/delethink"
  seed: int = 0
  markov: MarkovConfig = MarkovConfig(chunk_size=50, carryover=25, head=5, max_chunks=5)
  sft_task: RunningSumTask = RunningSumTask(min_steps=2, max_steps=18)
  rl_task: RunningSumTask = RunningSumTask(min_steps=8, max_steps=18)  # 18 steps fill the 150-token budget
  eval_task: RunningSumTask = RunningSumTask(min_steps=10, max_steps=60)  # 60 steps fit 4x the budget
  budget_multiples: tuple[int, ...] = (1, 2, 4)
  model: common.TinyModel = common.TinyModel()
  max_position_embeddings: int = 1024  # RoPE: no learned positions; long-context eval needs the table only
  sft_examples: int = 12000  # full written solutions of sft_task
  chunk_task: RunningSumTask = RunningSumTask(min_steps=19, max_steps=75)
  chunk_traces: int = 1500  # written traces of chunk_task, cut into Delethink chunks for SFT
  sft: SFTConfig = SFTConfig(steps=800, batch_size=32, max_len=176, checkpoint_every=200,
                             optim=OptimConfig(lr=1e-3, warmup_frac=0.05, min_lr_ratio=0.1))
  rl: RLConfig = RLConfig(
      steps=30, prompts_per_step=8, group_size=8, checkpoint_every=10, kl_monitor=False,
      sampling=SamplingConfig(max_new_tokens=150, temperature=1.0),
      loss=LossConfig(clip_eps_low=0.2, clip_eps_high=0.26, aggregation="seq_mean_token_mean"),
      advantage=AdvantageConfig(mode="grpo"), optim=OptimConfig(lr=5e-5, warmup_frac=0.1, min_lr_ratio=0.1))
  eval_problems: int = 256
  eval_batch: int = 256


def budget_eval(cfg: Config, model_config, params, tokenizer, problems, budget: int, delethink: bool) -> dict:
  """Greedy accuracy at a thinking budget: more chunks for Delethink inference, a longer context for LongCoT."""
  mk = MarkovConfig.for_budget(budget, cfg.markov.chunk_size, cfg.markov.carryover, cfg.markov.head)
  sampling = SamplingConfig(max_new_tokens=budget, greedy=True, stop_token_ids=tuple(tokenizer.stop_ids),
                            pad_id=tokenizer.pad_id)
  texts, lengths = generate_texts(model_config, params, tokenizer, [p.prompt for p in problems], sampling,
                                  jax.random.key(cfg.seed + 1), cfg.eval_batch, markov=mk if delethink else None)
  scores = np.asarray([cfg.eval_task.verify(t, p) for t, p in zip(texts, problems)])  # a regex: no worker pool
  steps = np.asarray([p.meta["steps"] for p in problems])
  by_steps = {f"{lo}-{lo + 9}": float(scores[(steps >= lo) & (steps < lo + 10)].mean())
              for lo in range(10, int(steps.max()) + 1, 10) if ((steps >= lo) & (steps < lo + 10)).any()}
  return {"acc": float(scores.mean()), "ci95": list(wilson_interval(float(scores.sum()), len(scores))),
          "mean_len": float(lengths.mean()), "budget": budget, "chunks": mk.max_chunks if delethink else 1,
          "examples": texts[:2], "acc_by_steps": by_steps}


@runlock.holding(lambda cfg: cfg.run_dir)  # one live launch per run dir, set-up to last write
def main(cfg: Config) -> dict:
  t0 = time.time()
  run_dir = Path(cfg.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  train_budget = cfg.markov.budget
  print(f"[delethink] seed={cfg.seed} markov={cfg.markov} training budget={train_budget} tokens", flush=True)
  tokenizer = common.build_tokenizer([cfg.sft_task, cfg.eval_task], run_dir, seed=cfg.seed, vocab_size=48)
  model_config, params = common.init_model(cfg.model, tokenizer, cfg.seed)
  model_config = dataclasses.replace(model_config, max_position_embeddings=cfg.max_position_embeddings)
  eval_problems = cfg.eval_task.generate(cfg.eval_problems, seed=cfg.seed, split="eval")

  print("[delethink] 1/4 SFT on full written solutions", flush=True)
  sft = dataclasses.replace(cfg.sft, run_dir=str(run_dir / "sft"), seed=cfg.seed)
  base = train_sft(sft, model_config, params, tokenizer, common.sft_pairs(cfg.sft_task, cfg.sft_examples, cfg.seed),
                   tokenized=markov_sft_rows(cfg, tokenizer)).params
  models = {"base": base}
  rl = dataclasses.replace(cfg.rl, seed=cfg.seed, sampling=dataclasses.replace(
      cfg.rl.sampling, max_new_tokens=train_budget))
  for i, arm in enumerate(("longcot", "delethink")):
    print(f"[delethink] {2 + i}/4 RL arm {arm!r}", flush=True)
    arm_cfg = dataclasses.replace(rl, run_dir=str(run_dir / arm))
    collector = MarkovCollector(arm_cfg, cfg.markov, model_config, tokenizer) if arm == "delethink" else None
    try:
      state, _ = train_rl(arm_cfg, model_config, base, tokenizer, TaskSource(cfg.rl_task, seed=cfg.seed),
                          collector=collector)
    finally:
      if collector is not None:
        collector.close()
    models[arm] = state.params

  print(f"[delethink] 4/4 greedy accuracy on {len(eval_problems)} held-out problems "
        f"({cfg.eval_task.min_steps}-{cfg.eval_task.max_steps} steps) at budgets "
        f"{[m * train_budget for m in cfg.budget_multiples]}", flush=True)
  results = {}
  for name, p in models.items():
    for mode in ("longcot", "delethink"):
      for mult in cfg.budget_multiples:
        r = budget_eval(cfg, model_config, p, tokenizer, eval_problems, mult * train_budget, mode == "delethink")
        results[f"{name}/{mode}-inference/{mult}x"] = r
        print(f"[delethink]   {name:9s} {mode:9s} inference, {mult}x budget ({r['budget']} tokens, "
              f"{r['chunks']} chunk(s)): acc {r['acc']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]  "
              f"mean len {r['mean_len']:.0f}", flush=True)

  table = budget_table(results, cfg.budget_multiples, train_budget)
  print("\n" + table, flush=True)
  (run_dir / "table.md").write_text(table + "\n")
  plot_budget(results, cfg.budget_multiples, train_budget, run_dir / "accuracy_vs_budget.png")
  plot_runs({arm: run_dir / arm for arm in ("longcot", "delethink")},
            ["accuracy", "reward_mean", "response_len", "entropy", "clip_frac", "grad_norm"], run_dir / "curves.png")
  out = {k: {kk: v[kk] for kk in ("acc", "ci95", "mean_len", "budget", "chunks", "acc_by_steps")}
         for k, v in results.items()}
  out = {"results": out, "runtime_s": round(time.time() - t0, 1), "seed": cfg.seed,
         "eval_problems": len(eval_problems), "train_budget": train_budget, "markov": dataclasses.asdict(cfg.markov),
         "plots": [str(run_dir / "accuracy_vs_budget.png"), str(run_dir / "curves.png")]}
  common.write_result(run_dir, out)
  return out


def markov_sft_rows(cfg: Config, tokenizer) -> list[tuple[list[int], list[float]]]:
  """Every Delethink chunk of `chunk_traces` written long traces, as (ids, loss mask) SFT rows."""
  rows = []
  for p in cfg.chunk_task.generate(cfg.chunk_traces, seed=cfg.seed, split="train", unique=False):
    response = tokenizer.encode(cfg.chunk_task.sft_target(p)) + [tokenizer.eos_id]
    rows += chunk_examples(tokenizer.encode(p.prompt, add_bos=True), response, cfg.markov)
  return rows


def budget_table(results: dict, multiples, train_budget: int) -> str:
  head = " | ".join(f"{m}x ({m * train_budget} tok)" for m in multiples)
  lines = [f"| model | inference | {head} |", "|---|---|" + "---|" * len(multiples)]
  for name in ("base", "longcot", "delethink"):
    for mode in ("longcot", "delethink"):
      cells = []
      for m in multiples:
        r = results[f"{name}/{mode}-inference/{m}x"]
        cells.append(f"{r['acc']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]")
      lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_budget(results: dict, multiples, train_budget: int, out_png: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  budgets = [m * train_budget for m in multiples]
  for name, color in (("base", "0.5"), ("longcot", "tab:orange"), ("delethink", "tab:blue")):
    for mode, style in (("longcot", "--"), ("delethink", "-")):
      rs = [results[f"{name}/{mode}-inference/{m}x"] for m in multiples]
      acc = np.asarray([r["acc"] for r in rs])
      err = np.abs(np.asarray([r["ci95"] for r in rs]).T - acc)
      ax.errorbar(budgets, acc, yerr=err, color=color, linestyle=style, marker="o", capsize=3,
                  label=f"{name}-RL model, {mode} inference" if name != "base" else f"SFT base, {mode} inference")
  ax.axvline(train_budget, color="k", lw=0.8, ls=":")
  ax.text(train_budget, 0.02, " training budget", fontsize=8)
  ax.set_xscale("log", base=2)
  ax.set_xticks(budgets, [str(b) for b in budgets])
  ax.set_xlabel("thinking budget (tokens)")
  ax.set_ylabel("greedy accuracy (95% Wilson CI)")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_png, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  cli.run(lambda: main(tyro.cli(Config)))
