"""AgentEvol on exrl's text environments: BC, then M = 1..4 explore-filter-retrain rounds, for K = 1 and 2.

  python -m experiments.agentevol [--iterations 4] [--ks 1 2] [--grpo-steps 0]

One tiny decoder plays all three envs (maze, wordle, textcraft), as AgentGym's AgentLM does. A SentencePiece
tokenizer is trained on expert text; BC trains on the scripted expert's trajectories (agent tokens only);
each AgentEvol arm (one per K) starts from the BC model, explores K samples per instruction at T = 1.2,
keeps the solved trajectories (reward > 0.99, deduplicated per instruction), merges them with all earlier
data and retrains (by default continuing from the last model; `--evol.retrain base` restarts from the base, as
the paper does). Every model is evaluated by greedy success on held-out instances
per env, with 95% Wilson CIs. `--grpo-steps N` adds the multi-turn GRPO arm from the BC model.
Writes runs/agentevol/{result.json,table.md,success_vs_m.png}; the last stdout line is the JSON result.

BC base of the defaults (seed 0; 200 expert trajectories for maze and wordle, 400 for textcraft, 8 epochs = 400
steps of batch 16; 12.5 min at load average ~13 on 2 CPU cores): greedy success on 32 held-out instances per env,
% [95% Wilson CI]: maze 65.6 [48, 80], wordle 100.0 [89, 100], textcraft 90.6 [76, 97]. Continued iterations
start at `iteration_lr` = 3e-4 (where BC's cosine schedule ended), not at BC's peak 3e-3.
Details and the comparison with the paper: docs/results/agentevol.md.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np
import tyro

from experiments import common
from exrl import cli
from exrl.infra import runlock
from exrl.envs import make_env
from exrl.envs.experts import run_expert
from exrl.rl.losses import LossConfig
from exrl.rollout.multiturn import MultiTurnConfig, agent_text, instruction_text, observation_text
from exrl.tokenizer import load_tokenizer, train_sentencepiece
from exrl.methods.agentevol import AgentEvolConfig, agentevol, build_env, evaluate_agent, multiturn_grpo
from exrl.train.rl_loop import RLConfig
from exrl.train.sft import SFTConfig
from exrl.train.state import OptimConfig

SMALL = common.TinyModel(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                         intermediate_size=384)
# instance difficulty of the default run: 4x4 mazes, Wordle over its first 30 words, one-level recipes
EASY = ("maze:size=4", "wordle:num_words=30", "textcraft:max_depth=1")


@dataclasses.dataclass(frozen=True)
class Config:
  """Defaults: BC for 8 epochs of 200 expert trajectories per env (400 for textcraft, whose ingredient copying is
  learned last), then each iteration continues from the last model for half an epoch of the merged data at
  lr 3e-4 (`--evol.retrain base` restarts from the base model, as the paper does, but then each iteration
  needs BC's full length)."""
  run_dir: str = "runs/agentevol"
  seed: int = 0
  model: common.TinyModel = SMALL
  vocab_size: int = 384
  ks: tuple[int, ...] = (1, 2)
  evol: AgentEvolConfig = AgentEvolConfig(
      expert_per_env=200, expert_counts=("textcraft=400",), explore_per_env=32, eval_per_env=32, iterations=4,
      sft_epochs=8.0, iteration_sft_epochs=0.5, iteration_lr=3e-4, retrain="continue",
      sft=SFTConfig(batch_size=16, max_len=512, optim=OptimConfig(lr=3e-3, warmup_frac=0.05, min_lr_ratio=0.1)),
      rollout=MultiTurnConfig(max_new_tokens=24, max_len=512), rollout_batch=96, env_kwargs=EASY)
  grpo_steps: int = 0  # > 0 adds the multi-turn GRPO arm (from the BC model) for comparison
  grpo: RLConfig = RLConfig(prompts_per_step=8, group_size=4,
                            loss=LossConfig(kl_beta=0.0), optim=OptimConfig(lr=1e-4, warmup_frac=0.0),
                            checkpoint_every=1000, kl_monitor=False)


def agent_tokenizer(envs, out_dir: Path, seed: int, vocab_size: int):
  """A SentencePiece model on expert trajectories' text (instructions, agent turns, observations)."""
  model_file = out_dir / "tokenizer.model"
  if model_file.exists():
    return load_tokenizer(model_file)
  corpus = []
  for name in envs:
    env = make_env(name, seed=seed + 7919)  # instances the experiments never train or evaluate on
    for i in range(300):
      tr = run_expert(env, i)
      corpus.append(instruction_text(tr.instruction))
      corpus += [agent_text(t, a) + observation_text(o) for t, a, o in tr.turns]
    env.reset(0)
    corpus += [observation_text(env.step(a).observation) for a in ("jump", "get x", "zzzzz")]
  return train_sentencepiece(corpus, vocab_size, out_dir / "tokenizer", byte_fallback=False, seed=seed)


def markdown(results: dict, envs) -> str:
  lines = ["| model | " + " | ".join(envs) + " | mean |", "|---|" + "---|" * (len(envs) + 1)]
  cell = lambda r: f"{100 * r['success']:.1f} [{100 * r['ci95'][0]:.0f}, {100 * r['ci95'][1]:.0f}]"
  for name, ev in results.items():
    lines.append(f"| {name} | " + " | ".join(cell(ev[e]) for e in envs) + f" | {100 * ev['mean']:.1f} |")
  return "\n".join(lines)


def plot(results: dict, envs, ks, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(envs) + 1, figsize=(4 * (len(envs) + 1), 3.2))
  for ax, env in zip(axes, [*envs, "mean"]):
    for k in ks:
      evs = [results["BC"]] + [results[f"K={k} M={m}"] for m in range(1, 99) if f"K={k} M={m}" in results]
      y = [100 * (e["mean"] if env == "mean" else e[env]["success"]) for e in evs]
      if env != "mean":
        lo = [y_ - 100 * e[env]["ci95"][0] for y_, e in zip(y, evs)]
        hi = [100 * e[env]["ci95"][1] - y_ for y_, e in zip(y, evs)]
        ax.errorbar(np.arange(len(y)) + 0.05 * k, y, yerr=[lo, hi], marker="o", capsize=3, label=f"K={k}")
      else:
        ax.plot(range(len(y)), y, marker="o", label=f"K={k}")
    ax.set_title(env)
    ax.set_xlabel("AgentEvol iteration M (0 = BC)")
    ax.set_ylabel("greedy success %")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


@runlock.holding(lambda cfg: cfg.run_dir)  # one live launch per run dir, set-up to last write
def main(cfg: Config) -> dict:
  t0 = time.time()
  run_dir = Path(cfg.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  evol = dataclasses.replace(cfg.evol, seed=cfg.seed)
  tokenizer = agent_tokenizer(evol.envs, run_dir, cfg.seed, cfg.vocab_size)
  model_config, base = common.init_model(cfg.model, tokenizer, cfg.seed)
  print(f"[agentevol] vocab={tokenizer.vocab_size}; {sum(x.size for x in jax.tree.leaves(base)) / 1e6:.2f}M params",
        flush=True)
  results, details = {}, {}
  bc = None
  for k in cfg.ks:
    arm = dataclasses.replace(evol, run_dir=str(run_dir / f"K{k}"), samples_per_instruction=k)
    out = agentevol(arm, model_config, base, tokenizer, bc=bc)  # every arm starts from the same BC model
    bc = (out["bc_params"], out["bc"])
    results.setdefault("BC", out["bc"])
    for it in out["iterations"]:
      results[f"K={k} M={it['m']}"] = it["eval"]
    details[f"K={k}"] = [{key: it[key] for key in ("m", "kept", "data", "explore_success", "elapsed_s")}
                         for it in out["iterations"]]
    print(f"[agentevol] K={k} done at {time.time() - t0:.0f} s", flush=True)
  if cfg.grpo_steps:
    rl = dataclasses.replace(cfg.grpo, run_dir=str(run_dir / "grpo"), steps=cfg.grpo_steps, seed=cfg.seed)
    state = multiturn_grpo(rl, model_config, bc[0], tokenizer, evol.envs, env_seed=evol.env_seed,
                           instances_per_env=evol.explore_per_env, rollout_cfg=evol.rollout,
                           success_threshold=evol.reward_threshold, env_factory=lambda n: build_env(evol, n))
    results[f"GRPO {cfg.grpo_steps} steps"] = evaluate_agent(evol, model_config, state.params, tokenizer)
  table = markdown(results, evol.envs)
  print("\n" + table, flush=True)
  (run_dir / "table.md").write_text(table + "\n")
  plot(results, evol.envs, cfg.ks, run_dir / "success_vs_m.png")
  out = {"results": results, "iterations": details, "runtime_s": round(time.time() - t0, 1), "seed": cfg.seed,
         "eval_per_env": evol.eval_per_env, "expert_per_env": evol.expert_per_env,
         "explore_per_env": evol.explore_per_env, "plot": str(run_dir / "success_vs_m.png")}
  (run_dir / "result.json").write_text(json.dumps(out, indent=2))
  common.write_result(run_dir, out)
  return out


if __name__ == "__main__":
  cli.run(lambda: main(tyro.cli(Config)))
