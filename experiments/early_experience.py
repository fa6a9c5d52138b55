"""Early Experience (arXiv 2510.08558) on exrl's text envs: imitation vs + implicit world modelling (IWM) vs
+ self-reflection (SR), each then followed by the same AgentEvol RL, in domain and out of domain.

  python -m experiments.early_experience [--rl-iterations 1] [--ee.branches 3] [--tiny]

The model, tokenizer, expert data, BC recipe and env difficulty are AgentEvol's defaults
(`experiments.agentevol.Config`). The BC model proposes the alternatives (K per expert state, T = 1) that are
stepped in the real envs from an exact restore of the expert's state; IWM trains next-observation prediction on
them, then imitation (the paper's two stages); SR mixes template rationales (why the expert's action beats the
alternatives, from their observed outcomes) + the expert action with the expert data. Every arm then runs
`--rl-iterations` AgentEvol rounds (K = 1, continuing from the arm's model). Greedy success on held-out instances
with 95% Wilson CIs: in domain (the training distribution; for wordle, words that training instances use) and
out of domain (mazes `--ood-maze-grow` cells wider, recipes `--ood-depth-grow` levels deeper, wordle over all
100 words, on targets no training instance uses). Writes runs/early_experience/{results.json,table.md,success.png}; the last stdout line
is the JSON result. Measured figures and their reading: docs/results/early_experience.md.
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
from experiments.agentevol import Config as AgentEvolExperiment, agent_tokenizer
from exrl import cli
from exrl.envs import MazeEnv, TextCraftEnv, WordleEnv
from exrl.infra import runlock
from exrl.methods.agentevol import (EVAL_OFFSET, AgentEvolConfig, _sft, agentevol, build_env, expert_count,
                                    run_rollouts, success_table)
from exrl.methods.early_experience import EarlyExperienceConfig, collect_branches, expert_data, train_iwm, train_sr
from exrl.rollout.multiturn import MultiTurnConfig
from exrl.train.sft import SFTConfig

ARMS = ("imitation", "iwm", "sr")
LABELS = {"imitation": "imitation", "iwm": "+IWM", "sr": "+SR"}
_BASE = AgentEvolExperiment()
TINY = common.TinyModel(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64)


@dataclasses.dataclass(frozen=True)
class Config:
  """evol: AgentEvol's recipe (BC epochs, data sizes, eval size, rollout budget); its `iterations` is replaced
  by `rl_iterations` and `retrain` is forced to "continue" (restarting from the base would erase the arms).
  The rollout's per-turn budget is raised to `turn_tokens` for every arm: SR's thoughts are longer."""
  run_dir: str = "runs/early_experience"
  seed: int = 0
  model: common.TinyModel = _BASE.model
  vocab_size: int = _BASE.vocab_size
  evol: AgentEvolConfig = _BASE.evol
  ee: EarlyExperienceConfig = EarlyExperienceConfig()
  arms: tuple[str, ...] = ARMS
  branch_per_env: int = 32  # expert trajectories per env whose states are branched (0: all); BC uses them all
  rl_iterations: int = 1
  turn_tokens: int = 48
  ood_maze_grow: int = 2
  ood_depth_grow: int = 1
  tiny: bool = False  # a miniature of the whole pipeline (CI): tiny model, a few instances, one short turn

  def __post_init__(self):
    if not self.arms or any(a not in ARMS for a in self.arms):
      raise ValueError(f"Config.arms={self.arms}; choose from {ARMS}")
    if self.rl_iterations < 0 or self.ood_maze_grow < 1 or self.ood_depth_grow < 1:
      raise ValueError(f"rl_iterations={self.rl_iterations} must be >= 0; ood_maze_grow={self.ood_maze_grow} "
                       f"and ood_depth_grow={self.ood_depth_grow} >= 1")


def miniature(cfg: Config) -> Config:
  """The `--tiny` run: every stage once, in about a minute on a CPU."""
  evol = dataclasses.replace(cfg.evol, envs=("maze", "wordle", "textcraft"), expert_per_env=3, expert_counts=(),
                             explore_per_env=3, eval_per_env=2, sft_epochs=1.0, iteration_sft_epochs=1.0,
                             sft=SFTConfig(batch_size=8, max_len=512),
                             rollout=MultiTurnConfig(max_new_tokens=8, max_turns=2, max_len=512), rollout_batch=8)
  ee = dataclasses.replace(cfg.ee, branches=2, proposals=2, max_new_tokens=8, state_batch=8, iwm_epochs=0.5,
                           sr_epochs=0.5, fill_random=True)  # a 2-step BC model proposes no parseable action
  return dataclasses.replace(cfg, model=TINY, vocab_size=320, evol=evol, ee=ee, turn_tokens=8, tiny=False)


def wordle_target(env, idx: int) -> str:
  env.reset(idx)
  return env.target


def eval_items(evol: AgentEvolConfig, factory, seen_words: set, ood: bool) -> list[tuple[str, int]]:
  """Held-out instances per env; wordle's are kept by whether a training instance uses the word (in domain)
  or none does (out of domain)."""
  items = []
  for name in evol.envs:
    if name != "wordle":
      items += [(name, EVAL_OFFSET + i) for i in range(evol.eval_per_env)]
      continue
    env, idx, picked = factory(name), EVAL_OFFSET, []
    while len(picked) < evol.eval_per_env:
      if (wordle_target(env, idx) in seen_words) != ood:
        picked.append(idx)
      idx += 1
    items += [(name, i) for i in picked]
  return items


def ood_env(evol: AgentEvolConfig, cfg: Config, name: str):
  """Out of domain: a wider maze, deeper recipes, wordle over all its words (`eval_items` keeps unseen ones)."""
  env = build_env(evol, name)
  if name == "maze":
    return MazeEnv(seed=env.seed, size=env.size + cfg.ood_maze_grow, wall_frac=env.wall_frac)
  if name == "textcraft":
    return TextCraftEnv(seed=env.seed, max_depth=env.max_depth + cfg.ood_depth_grow)
  if name == "wordle":
    return WordleEnv(seed=env.seed)
  return env


def evaluate_splits(cfg: Config, evol: AgentEvolConfig, model_config, params, tokenizer, seen_words: set) -> dict:
  """{"id": success_table, "ood": success_table}: greedy, one episode per held-out instance."""
  greedy = dataclasses.replace(evol.rollout, greedy=True)
  out = {}
  for split, factory in (("id", lambda n: build_env(evol, n)), ("ood", lambda n: ood_env(evol, cfg, n))):
    items = eval_items(evol, factory, seen_words, split == "ood")
    trajs = run_rollouts(model_config, params, tokenizer, items, jax.random.key(0), greedy, evol.rollout_batch,
                         factory)
    out[split] = success_table(trajs, evol.reward_threshold)
  return out


def cell(r: dict) -> str:
  return f"{100 * r['success']:.1f} [{100 * r['ci95'][0]:.0f}, {100 * r['ci95'][1]:.0f}]"


def markdown(results: dict, envs) -> str:
  """Rows env x split, columns the models (like the paper's main table), deltas against imitation."""
  names = list(results)
  lines = ["| env | split | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
  for split in ("id", "ood"):
    for env in envs:
      row = []
      for name in names:
        r = results[name][split][env]
        ref = results.get(name.replace(name.split(" ")[0], "imitation", 1), {}).get(split, {}).get(env)
        delta = "" if name.startswith("imitation") or ref is None else f" ({100 * (r['success'] - ref['success']):+.1f})"
        row.append(cell(r) + delta)
      lines.append(f"| {env} | {split.upper()} | " + " | ".join(row) + " |")
    means = [f"{100 * results[n][split]['mean']:.1f}" for n in names]
    lines.append(f"| mean | {split.upper()} | " + " | ".join(means) + " |")
  return "\n".join(lines)


def plot(results: dict, envs, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(results)
  fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), sharey=True)
  width = 0.8 / len(names)
  for ax, split in zip(axes, ("id", "ood")):
    x = np.arange(len(envs))
    for j, name in enumerate(names):
      rs = [results[name][split][e] for e in envs]
      y = np.array([100 * r["success"] for r in rs])
      err = [y - [100 * r["ci95"][0] for r in rs], [100 * r["ci95"][1] for r in rs] - y]
      ax.bar(x + j * width, y, width, yerr=err, capsize=2, label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, envs)
    ax.set_title("in domain" if split == "id" else "out of domain")
    ax.set_ylabel("greedy success % (95% CI)")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


@runlock.holding(lambda cfg: cfg.run_dir)  # one live launch per run dir, set-up to last write
def main(cfg: Config) -> dict:
  if cfg.tiny:
    cfg = miniature(cfg)
  t0 = time.time()
  run_dir = Path(cfg.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  rollout = dataclasses.replace(cfg.evol.rollout, max_new_tokens=max(cfg.evol.rollout.max_new_tokens, cfg.turn_tokens))
  evol = dataclasses.replace(cfg.evol, seed=cfg.seed, rollout=rollout, retrain="continue",
                             iterations=cfg.rl_iterations, samples_per_instruction=1)
  tokenizer = agent_tokenizer(evol.envs, run_dir, cfg.seed, cfg.vocab_size)
  model_config, base = common.init_model(cfg.model, tokenizer, cfg.seed)
  log = lambda msg: print(f"[early_experience {time.time() - t0:.0f}s] {msg}", flush=True)
  log(f"vocab={tokenizer.vocab_size}; {sum(x.size for x in jax.tree.leaves(base)) / 1e6:.2f}M params")

  trajs, expert = expert_data(evol, tokenizer)
  seen_words = set()
  if "wordle" in evol.envs:
    env = build_env(evol, "wordle")
    seen_words = {wordle_target(env, i) for i in range(max(expert_count(evol, "wordle"), evol.explore_per_env))}
  arm_cfg = lambda arm: dataclasses.replace(evol, run_dir=str(run_dir / arm))
  bc = _sft(arm_cfg("imitation"), "bc", model_config, base, tokenizer, expert, evol.sft_epochs)
  log(f"BC on {len(expert)} expert trajectories done")
  per_env = cfg.branch_per_env or evol.expert_per_env
  branched = [t for t in trajs if t.idx < per_env]
  branches = collect_branches(model_config, bc, tokenizer, branched, lambda n: build_env(evol, n),
                              jax.random.key(cfg.seed + 17), cfg.ee, cfg.seed)
  states = sum(len(t.turns) for t in branched)
  log(f"{len(branches)} branches from {states} expert states (K={cfg.ee.branches})")
  split_eval = lambda params: evaluate_splits(cfg, evol, model_config, params, tokenizer, seen_words)
  results, rl_details = {}, {}
  for arm in cfg.arms:  # each arm trained, evaluated and RL'd in turn; table.md is rewritten after each
    if arm == "imitation":
      params = bc
    elif arm == "iwm":
      params = train_iwm(arm_cfg("iwm"), cfg.ee, model_config, base, tokenizer, trajs, expert, branches)
    else:
      params = train_sr(arm_cfg("sr"), cfg.ee, model_config, base, tokenizer, trajs, expert, branches,
                        evol.reward_threshold)
    results[LABELS[arm]] = split_eval(params)
    log(f"{arm}: {json.dumps(results[LABELS[arm]])}")
    (run_dir / "table.md").write_text(markdown(results, evol.envs) + "\n")
    if cfg.rl_iterations:
      out = agentevol(dataclasses.replace(arm_cfg(arm), run_dir=str(run_dir / arm / "rl")), model_config, base,
                      tokenizer, bc=(params, results[LABELS[arm]]), log=log, evaluate=split_eval)
      results[f"{LABELS[arm]} -> RL"] = out["iterations"][-1]["eval"]
      rl_details[arm] = [{k: it[k] for k in ("m", "kept", "data")} for it in out["iterations"]]
      (run_dir / "table.md").write_text(markdown(results, evol.envs) + "\n")
  table = markdown(results, evol.envs)
  print("\n" + table, flush=True)
  (run_dir / "table.md").write_text(table + "\n")
  plot(results, evol.envs, run_dir / "success.png")
  by_env = lambda env: sum(b.env == env for b in branches)
  out = {"results": results, "rl": rl_details, "runtime_s": round(time.time() - t0, 1), "seed": cfg.seed,
         "eval_per_env": evol.eval_per_env, "expert_per_env": {env: expert_count(evol, env) for env in evol.envs},
         "expert_states": states,
         "branches": {env: by_env(env) for env in evol.envs}, "branches_per_state": cfg.ee.branches,
         "rl_iterations": cfg.rl_iterations, "wordle_seen_words": len(seen_words),
         "plot": str(run_dir / "success.png")}
  common.write_result(run_dir, out)
  return out


if __name__ == "__main__":
  cli.run(lambda: main(tyro.cli(Config)))
