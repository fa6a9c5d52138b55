"""ExIt on Countdown: GRPO vs + curriculum / + improve / + diverge / full ExIt from one SFT base, evaluated
by K-step self-iteration on held-out problems (arXiv 2509.04575, the paper's Table 1 layout).

  python -m experiments.exit

1. a SentencePiece tokenizer and a tiny Qwen2-style decoder; SFT on Countdown answers, plus improve and
   diverge prompts (request + a random attempt -> the solution), so the base can read both prompt kinds;
2. from that base, one RL run per arm, all through `train_rl(..., source=ExItSource(...))`:
     grpo        base tasks only (p = 0)
     curriculum  + the learnability buffer over base tasks (p, κ; no self-iteration)
     improve     + improve steps from the buffer's partial histories (p_div = 0)
     diverge     + divergence steps (p_div)
     full        + the diversity bonus on advantages (full ExIt)
3. K-step self-iteration on held-out problems (K = 1, 4, 8: step 1 answers the request, step k > 1 sees the
   request and the latest answer in the improve prompt), reporting the mean graded quality at K and
   Δ_K = mean(q_K - q_1), with 95% normal intervals over problems (paired for Δ).

More RL seeds from the same SFT base, then the across-seed table (mean and 95% t interval over seeds):

  python -m experiments.exit --seed 1 --run-dir runs/exit/seed1 --base-dir runs/exit
  python -m experiments.exit --aggregate runs/exit/result.json runs/exit/seed1/result.json ...

Runtime and measured result (4 seeds, 256 held-out problems): see docs/results/exit.md.
The last stdout line is the JSON result, also written to runs/exit/results.json.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import jax
import numpy as np
import tyro

from experiments import common
from exrl import cli
from exrl.curriculum.exit_source import ExItConfig, ExItSource
from exrl.curriculum.source import TaskSource
from exrl.rl.advantages import AdvantageConfig
from exrl.rl.losses import LossConfig
from exrl.rollout.sampler import SamplingConfig
from exrl.tasks import self_iteration as si
from exrl.tasks.countdown import CountdownTask
from exrl.tasks.pool import VerifierPool, verifier_rewards
from exrl.tokenizer import load_tokenizer, train_sentencepiece
from exrl.train.collect.groups import GroupCollector
from exrl.train.diversity import DiversityBonusCollector
from exrl.train.evaluate import generate_texts, wilson_interval
from exrl.infra import runlock
from exrl.infra.plot import plot_runs
from exrl.train.rl_loop import RLConfig, train_rl
from exrl.train.sft import SFTConfig, train_sft
from exrl.train.state import OptimConfig

ARMS = ("grpo", "curriculum", "improve", "diverge", "full")
LABELS = {"base": "base (SFT)", "grpo": "GRPO", "curriculum": "+ curriculum", "improve": "+ improve",
          "diverge": "+ diverge", "full": "full ExIt"}


@dataclasses.dataclass(frozen=True)
class Config:
  """The seeds, run dirs and source settings inside `sft`, `rl` and `exit` are set per arm from these."""
  run_dir: str = "runs/exit"
  seed: int = 0  # RL, the ExIt buffer and eval sampling
  base_seed: int = 0  # the SFT base (its data, tokenizer and training) and the held-out problems
  base_dir: str = ""  # where tokenizer.model and sft/ live (default run_dir): RL seeds can share one SFT base
  task: CountdownTask = CountdownTask(num_numbers=3, max_number=9, max_target=99)
  model: common.TinyModel = common.TinyModel()
  vocab_size: int = 128
  sft_examples: int = 20000
  sft_revise_frac: float = 0.4  # share of SFT examples that are improve/diverge prompts (1/4 of them diverge)
  sft: SFTConfig = SFTConfig(steps=400, batch_size=64, max_len=96, checkpoint_every=400,
                             optim=OptimConfig(lr=1e-3, warmup_frac=0.05, min_lr_ratio=0.1))
  rl: RLConfig = RLConfig(
      steps=60, prompts_per_step=16, group_size=8, checkpoint_every=30,
      sampling=SamplingConfig(max_new_tokens=16, temperature=1.0), loss=LossConfig(kl_beta=0.001),
      advantage=AdvantageConfig(mode="grpo"), optim=OptimConfig(lr=1e-4, warmup_frac=0.1, min_lr_ratio=0.1))
  exit: ExItConfig = ExItConfig(capacity=256, min_size=32, p=0.5, p_div=0.2, kappa=10.0, prompt_budget=96)
  arms: tuple[str, ...] = ARMS
  eval_problems: int = 256  # the eval split of countdown/3/9/99 holds 261 distinct problems
  eval_k: tuple[int, ...] = (1, 4, 8)
  eval_temperature: float = 1.0
  eval_batch: int = 256
  aggregate: tuple[str, ...] = ()  # result.json files of finished runs (one per seed): the across-seed table, no training


def arm_exit_config(cfg: Config, arm: str) -> ExItConfig:
  if arm not in ARMS:
    raise ValueError(f"arm={arm!r}; valid arms: {ARMS}")
  e = dataclasses.replace(cfg.exit, seed=cfg.seed)
  return {"grpo": dataclasses.replace(e, p=0.0, p_div=0.0, improve=False),
          "curriculum": dataclasses.replace(e, p_div=0.0, improve=False),
          "improve": dataclasses.replace(e, p_div=0.0), "diverge": e, "full": e}[arm]


def random_attempt(problem, rng: random.Random) -> str:
  """An SFT-time stand-in for a previous answer: the problem's numbers in random order with random ops."""
  nums = list(problem.meta["numbers"])
  rng.shuffle(nums)
  expr = str(nums[0]) + "".join(f"{rng.choice('+-*')}{x}" for x in nums[1:])
  return f"answer: {expr}"


def sft_pairs(task: CountdownTask, n: int, seed: int, revise_frac: float) -> list[tuple[str, str]]:
  """(prompt, target): base prompts, and improve/diverge prompts around a random attempt, all -> the solution."""
  rng = random.Random(f"exit-sft|{seed}")
  out = []
  for p in task.generate(n, seed=seed, split="train", unique=False):
    target = task.sft_target(p)
    u = rng.random()
    if u < revise_frac:
      prev = random_attempt(p, rng)
      mode = "diverge" if u < revise_frac / 4 else "improve"
      if mode == "diverge":  # summarise the old approach, then answer
        target = f"before {prev[len('answer: '):]}. {target}"
      out.append((si.build_prompt(p.prompt, prev, mode), target))
    else:
      out.append((p.prompt, target))
  return out


def build_tokenizer(pairs, out_dir: Path, vocab_size: int, seed: int):
  model_file = out_dir / "tokenizer.model"
  if model_file.exists():
    return load_tokenizer(model_file)
  corpus = [t for pair in pairs[:4000] for t in pair]
  return train_sentencepiece(corpus, vocab_size, out_dir / "tokenizer", byte_fallback=False, seed=seed)


def mean_ci(x) -> tuple[float, list[float]]:
  x = np.asarray(x, np.float64)
  half = 1.96 * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("inf")
  return float(x.mean()), [float(x.mean() - half), float(x.mean() + half)]


def self_iterate(model_config, params, tokenizer, problems, K: int, sampling: SamplingConfig, seed: int,
                 batch_size: int, pool: VerifierPool) -> np.ndarray:
  """float64[K, n] base quality of iterate k = 1..K: step 1 answers the request, step k > 1 improves iterate k-1."""
  key = jax.random.key(seed)
  latest, out = None, []
  for k in range(K):
    prompts = [p.prompt if k == 0 else si.build_prompt(p.prompt, latest[i], "improve")
               for i, p in enumerate(problems)]
    latest, _ = generate_texts(model_config, params, tokenizer, prompts, sampling, jax.random.fold_in(key, k),
                               batch_size)
    q, _ = verifier_rewards(latest, problems, None, pool=pool)
    out.append(np.asarray(q, np.float64))
  return np.stack(out)


def summarise(q_KxN: np.ndarray, ks) -> dict:
  r = {}
  for k in ks:
    r[f"score_k{k}"], r[f"score_k{k}_ci95"] = mean_ci(q_KxN[k - 1])
    solved = float(np.sum(q_KxN[k - 1] == 1.0))
    r[f"solved_k{k}"] = solved / q_KxN.shape[1]
    r[f"solved_k{k}_ci95"] = list(wilson_interval(solved, q_KxN.shape[1]))
    if k > 1:
      r[f"delta_k{k}"], r[f"delta_k{k}_ci95"] = mean_ci(q_KxN[k - 1] - q_KxN[0])
  r["score_by_k"] = [float(x) for x in q_KxN.mean(1)]
  return r


def table(results: dict, ks) -> str:
  kmax = max(ks)
  head = "| model | " + " | ".join(f"score K={k} [95% CI]" for k in ks) + f" | Δ{kmax} [95% CI] | solved K={kmax} |"
  lines = [head, "|" + "---|" * (len(ks) + 3)]
  fmt = lambda v, ci: f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
  for name, r in results.items():
    cells = [fmt(r[f"score_k{k}"], r[f"score_k{k}_ci95"]) for k in ks]
    cells.append(f"{r[f'delta_k{kmax}']:+.3f} [{r[f'delta_k{kmax}_ci95'][0]:+.3f}, {r[f'delta_k{kmax}_ci95'][1]:+.3f}]")
    cells.append(f"{r[f'solved_k{kmax}']:.3f}")
    lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_k_curves(results: dict, out_png: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, r in results.items():
    ax.plot(range(1, len(r["score_by_k"]) + 1), r["score_by_k"], marker="o", label=LABELS.get(name, name))
  ax.set_xlabel("self-iteration step k")
  ax.set_ylabel("mean quality (held-out)")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out_png, dpi=120)
  plt.close(fig)


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def seed_ci(x) -> tuple[float, list[float]]:
  """Mean and 95% Student-t interval over seeds (each seed's value is one observation)."""
  x = np.asarray(x, np.float64)
  if len(x) < 2:
    return float(x.mean()), [float("nan"), float("nan")]
  half = T975.get(len(x) - 1, 1.96) * x.std(ddof=1) / math.sqrt(len(x))
  return float(x.mean()), [float(x.mean() - half), float(x.mean() + half)]


def aggregate(paths, ks, out_png: Path | None = None) -> dict:
  """Across-seed summary of finished runs: per arm, the mean over seeds of the score at each K, of Δ_K, and of
  (arm - GRPO) at K = max(ks) paired by seed, each with a 95% t interval over seeds."""
  runs = [json.loads(Path(p).read_text()) for p in paths]
  kmax = max(ks)
  arms = [a for a in runs[0]["results"] if all(a in r["results"] for r in runs)]
  out = {"seeds": [r["seed"] for r in runs], "eval_problems": runs[0]["eval_problems"], "arms": {}}
  for a in arms:
    rs = [r["results"][a] for r in runs]
    o = {f"score_k{k}": seed_ci([x[f"score_k{k}"] for x in rs]) for k in ks}
    o[f"delta_k{kmax}"] = seed_ci([x[f"delta_k{kmax}"] for x in rs])
    if "grpo" in arms:
      o[f"vs_grpo_k{kmax}"] = seed_ci([x[f"score_k{kmax}"] - r["results"]["grpo"][f"score_k{kmax}"]
                                       for x, r in zip(rs, runs)])
    o["score_by_k"] = np.mean([x["score_by_k"] for x in rs], 0).tolist()
    o["score_by_k_sd"] = np.std([x["score_by_k"] for x in rs], 0, ddof=1).tolist() if len(rs) > 1 else None
    out["arms"][a] = o
  fmt = lambda v, sign="": f"{v[0]:{sign}.3f} [{v[1][0]:{sign}.3f}, {v[1][1]:{sign}.3f}]"
  lines = ["| model | " + " | ".join(f"score K={k}" for k in ks) + f" | Δ{kmax} | K={kmax} minus GRPO |",
           "|" + "---|" * (len(ks) + 3)]
  for a, o in out["arms"].items():
    cells = [fmt(o[f"score_k{k}"]) for k in ks] + [fmt(o[f"delta_k{kmax}"], "+")]
    cells.append(fmt(o[f"vs_grpo_k{kmax}"], "+") if f"vs_grpo_k{kmax}" in o and a != "grpo" else "")
    lines.append(f"| {LABELS.get(a, a)} | " + " | ".join(cells) + " |")
  out["table"] = "\n".join(lines)
  if out_png is not None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for a, o in out["arms"].items():
      k = np.arange(1, len(o["score_by_k"]) + 1)
      ax.errorbar(k + 0.04 * (list(out["arms"]).index(a) - 2.5), o["score_by_k"], yerr=o["score_by_k_sd"],
                  marker="o", ms=3, capsize=2, label=LABELS.get(a, a))
    ax.set_xlabel("self-iteration step k")
    ax.set_ylabel("mean quality (held-out), ±1 sd over seeds")
    ax.set_title(f"{len(runs)} seeds x {out['eval_problems']} problems", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
  return out


@runlock.holding(lambda cfg: cfg.run_dir)  # one live launch per run dir, set-up to last write
def main(cfg: Config) -> dict:
  if cfg.aggregate:
    out = aggregate(cfg.aggregate, cfg.eval_k, Path(cfg.run_dir) / "k_step_seeds.png")
    print(out["table"], flush=True)
    (Path(cfg.run_dir) / "seeds.json").write_text(json.dumps(out, indent=2))
    return out
  t0 = time.time()
  run_dir = Path(cfg.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  task = cfg.task
  base_dir = Path(cfg.base_dir or cfg.run_dir)
  base_dir.mkdir(parents=True, exist_ok=True)
  pairs = sft_pairs(task, cfg.sft_examples, cfg.base_seed, cfg.sft_revise_frac)
  tokenizer = build_tokenizer(pairs, base_dir, cfg.vocab_size, cfg.base_seed)
  encode = lambda s: tokenizer.encode(s, add_bos=True)
  model_config, params = common.init_model(cfg.model, tokenizer, cfg.base_seed)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"[exit] task={task} vocab={tokenizer.vocab_size} model {n_params / 1e6:.2f}M params", flush=True)
  eval_problems = task.generate(cfg.eval_problems, seed=cfg.base_seed, split="eval")
  K = max(cfg.eval_k)
  sampling = SamplingConfig(max_new_tokens=cfg.rl.sampling.max_new_tokens, temperature=cfg.eval_temperature,
                            stop_token_ids=tuple(tokenizer.stop_ids), pad_id=tokenizer.pad_id)
  pool = VerifierPool(timeout_s=cfg.rl.verifier_timeout_s)
  timings = {}
  try:
    print("[exit] SFT warm-start", flush=True)
    t = time.time()
    sft = dataclasses.replace(cfg.sft, run_dir=str(base_dir / "sft"), seed=cfg.base_seed)
    base = train_sft(sft, model_config, params, tokenizer, pairs).params
    timings["sft_s"] = time.time() - t
    results, curves, per_problem = {}, {}, {}

    def run_eval(name, p):
      t = time.time()
      q = self_iterate(model_config, p, tokenizer, eval_problems, K, sampling, cfg.seed + 1, cfg.eval_batch, pool)
      results[name] = summarise(q, cfg.eval_k)
      per_problem[name] = q.round(4).tolist()  # [K][problem], for paired comparisons across arms and seeds
      timings[f"eval_{name}_s"] = time.time() - t
      print(f"[exit] {name}: score by k {np.round(results[name]['score_by_k'], 3).tolist()}", flush=True)

    run_eval("base", base)
    for arm in cfg.arms:
      print(f"[exit] RL arm {arm!r}", flush=True)
      t = time.time()
      ecfg = arm_exit_config(cfg, arm)
      rl = dataclasses.replace(cfg.rl, run_dir=str(run_dir / arm), seed=cfg.seed)
      source = ExItSource(TaskSource(task, seed=cfg.seed), ecfg, count_tokens=lambda s: len(encode(s)), pool=pool)
      collector = GroupCollector(rl, model_config, tokenizer, encode=encode, pool=pool)
      if arm == "full":
        collector = DiversityBonusCollector(collector, model_config)
      state, _ = train_rl(rl, model_config, base, tokenizer, source, collector=collector, encode=encode)
      collector.close()
      timings[f"rl_{arm}_s"] = time.time() - t
      curves[arm] = run_dir / arm
      run_eval(arm, state.params)
      results[arm]["exit_counts"] = {k: v for k, v in source.stats().items()}
  finally:
    pool.close()

  print("\n" + table(results, cfg.eval_k), flush=True)
  plot_k_curves(results, run_dir / "k_step.png")
  plot_runs(curves, ["reward_mean", "accuracy", "response_len", "kl", "exit/buffer_size", "exit/buffer_score_mean"],
            run_dir / "curves.png")
  (run_dir / "table.md").write_text(table(results, cfg.eval_k) + "\n")
  out = {"results": results, "runtime_s": round(time.time() - t0, 1), "timings_s": {k: round(v, 1) for k, v in
         timings.items()}, "seed": cfg.seed, "base_seed": cfg.base_seed, "eval_problems": len(eval_problems),
         "task": str(task),
         "k_step_plot": str(run_dir / "k_step.png"), "curves": str(run_dir / "curves.png")}
  (run_dir / "result.json").write_text(json.dumps(out, indent=2))
  (run_dir / "per_problem.json").write_text(json.dumps(per_problem))
  common.write_result(run_dir, out)
  return out


if __name__ == "__main__":
  cli.run(lambda: main(tyro.cli(Config)))
