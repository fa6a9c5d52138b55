"""Quickstart: a tiny model learns arithmetic by imitation, then from its own experience.

  python -m experiments.quickstart

1. trains a SentencePiece tokenizer on the task text;
2. SFT-trains a tiny Qwen2-style decoder (exrl's own config) to a modest accuracy: the base;
3. from that base runs two RL arms: GRPO with the verifier reward, and Intuitor with the
   self-certainty reward (no labels);
4. evaluates base, GRPO and Intuitor on held-out problems (pass@1 at T=1 and greedy, 95% Wilson CIs),
   prints a table, and writes results.json and PNG learning curves into the run folder.

Result (jax 0.10.2, seed 0, 500 held-out problems, pass@1 / greedy, 95% CIs; 3,090 s on the 2-core dev box
shared with other jobs, load average ~12; another CPU model can give other numbers, see README.md):
  base      0.276 [0.239, 0.317] / 0.452 [0.409, 0.496]
  grpo      0.346 [0.306, 0.389] / 0.528 [0.484, 0.571]
  intuitor  0.004 [0.001, 0.014] / 0.006 [0.002, 0.017]   (collapses; see README.md)
The last stdout line is the JSON result, also written to runs/quickstart/results.json.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import tyro

from experiments import common
from exrl import cli
from exrl.curriculum.source import TaskSource
from exrl.rl.advantages import AdvantageConfig
from exrl.rl.losses import LossConfig
from exrl.rollout.sampler import SamplingConfig
from exrl.tasks import get_task
from exrl.tasks.math_data import extract_answer
from exrl.train.evaluate import EvalConfig, answer_probe, evaluate
from exrl.infra import runlock
from exrl.infra.plot import plot_runs
from exrl.models import lora, quant
from exrl.train.rl_loop import RLConfig, train_rl
from exrl.train.sft import SFTConfig, train_sft
from exrl.train.state import OptimConfig


@dataclasses.dataclass(frozen=True)
class Config:
  """The quickstart. `--seed` seeds everything (tokenizer, model, SFT, eval problems, both RL arms), and
  each arm runs in run_dir/ARM with its own reward, so the seeds, run dirs and reward inside `sft` and
  `rl` are set from these and not read."""
  run_dir: str = "runs/quickstart"
  seed: int = 0
  task: str = "arithmetic"
  digits: int = 2
  model: common.TinyModel = common.TinyModel()
  sft_examples: int = 20000
  sft: SFTConfig = SFTConfig(steps=500, batch_size=64, checkpoint_every=500,
                             optim=OptimConfig(lr=1e-3, warmup_frac=0.05, min_lr_ratio=0.1))
  rl: RLConfig = RLConfig(
      steps=200, prompts_per_step=16, group_size=8, checkpoint_every=100,
      sampling=SamplingConfig(max_new_tokens=8, temperature=1.0), loss=LossConfig(kl_beta=0.005),
      advantage=AdvantageConfig(mode="grpo"), optim=OptimConfig(lr=1e-4, warmup_frac=0.1, min_lr_ratio=0.1),
      eval=EvalConfig(batch_size=250, sampling=SamplingConfig(max_new_tokens=8, temperature=1.0)))
  eval_problems: int = 500
  probe_problems: int = 64  # what each model answers: 8 samples on each of these held-out problems
  arms: tuple[str, ...] = ("grpo", "intuitor")  # RL arms to run (e.g. --arms grpo for the LoRA comparison)


def task_for(cfg: Config):
  if cfg.task == "arithmetic":
    return get_task("arithmetic", digits=cfg.digits, ops="+")
  return get_task(cfg.task)


def rl_config(cfg: Config, name: str, reward: str) -> RLConfig:
  """The RL arm `name`: the shared `cfg.rl` with this arm's reward, run dir and the run's seed."""
  return dataclasses.replace(cfg.rl, run_dir=str(Path(cfg.run_dir) / name), reward=reward, seed=cfg.seed,
                             eval=dataclasses.replace(cfg.rl.eval, seed=cfg.seed + 1))


@runlock.holding(lambda cfg: cfg.run_dir)  # one live launch per run dir, set-up to last write
def main(cfg: Config) -> dict:
  t0 = time.time()
  run_dir = Path(cfg.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  task = task_for(cfg)
  print(f"[quickstart] task={task} seed={cfg.seed} run_dir={run_dir}", flush=True)
  tokenizer = common.build_tokenizer([task], run_dir, seed=cfg.seed)
  model_config, params = common.init_model(cfg.model, tokenizer, cfg.seed)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"[quickstart] tokenizer vocab={tokenizer.vocab_size}; model {n_params / 1e6:.2f}M params", flush=True)
  eval_problems = task.generate(cfg.eval_problems, seed=cfg.seed, split="eval")
  eval_cfg = dataclasses.replace(cfg.rl.eval, seed=cfg.seed + 1)

  print("[quickstart] 1/4 SFT warm-start", flush=True)
  sft = dataclasses.replace(cfg.sft, run_dir=str(run_dir / "sft"), seed=cfg.seed)
  base = train_sft(sft, model_config, params, tokenizer, common.sft_pairs(task, cfg.sft_examples, cfg.seed)).params
  print("[quickstart] 2/4 evaluating the SFT base", flush=True)
  results = {"base": evaluate(model_config, base, tokenizer, eval_problems, task.verify, eval_cfg)}
  params_of = {"base": base}

  arms = {name: reward for name, reward in {"grpo": "verifier", "intuitor": "self_certainty"}.items()
          if name in cfg.arms}
  if not arms or len(arms) != len(set(cfg.arms)):
    raise ValueError(f"arms={cfg.arms!r}; valid: 'grpo', 'intuitor' (one or both)")
  for i, (name, reward) in enumerate(arms.items()):
    print(f"[quickstart] {3 + i}/4 RL arm {name!r} (reward={reward})", flush=True)
    arm_cfg = rl_config(cfg, name, reward)
    state, results[name] = train_rl(arm_cfg, model_config, base, tokenizer,
                                    TaskSource(task, seed=cfg.seed), eval_problems=eval_problems, verify=task.verify)
    # A LoRA arm's state is the adapter alone: the probe samples it on the base it was trained on.
    params_of[name] = (lora.combine(quant.quantize_base(base, arm_cfg.lora.base_dtype), state.params, arm_cfg.lora)
                       if arm_cfg.lora.on else state.params)

  probes = {name: answer_probe(model_config, params_of[name], tokenizer, eval_problems[:cfg.probe_problems],
                               extract_answer, cfg.rl.sampling, samples=8, seed=cfg.seed + 2) for name in results}
  print("\n" + common.table(results), flush=True)
  print("\n" + common.probe_table(probes), flush=True)
  plot_runs({name: run_dir / name for name in arms},
            ["accuracy", "reward_mean", "self_certainty_reward", "response_len", "kl", "entropy"],
            run_dir / "curves.png")
  out = {name: {**common.compact(r), "probe": probes[name]} for name, r in results.items()}
  out.update(runtime_s=round(time.time() - t0, 1), seed=cfg.seed, eval_problems=len(eval_problems),
             task=str(task), curves=str(run_dir / "curves.png"))
  common.write_result(run_dir, out)
  return out


if __name__ == "__main__":
  cli.run(lambda: main(tyro.cli(Config)))
