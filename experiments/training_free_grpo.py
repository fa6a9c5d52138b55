"""Training-Free GRPO (arXiv 2510.08191) against gradient GRPO from the same base, at equal rollout budgets.

  python -m experiments.training_free_grpo                       # CPU default: exrl's tiny arithmetic model
  python -m experiments.training_free_grpo --endpoint http://127.0.0.1:8000/v1 --endpoint-model NAME \\
      --data train.jsonl --ood-data ood.jsonl [--model DIR]      # a served instruct model (vLLM, exrl.serve)

Arms, from one base: `base` (frozen, no library); `training_free` (frozen, the library learned over
`tf.epochs` epochs of the training problems in context); `grpo` (exrl.train.rl_loop.train_rl on the same
problems with group size G and `tf.batch_size` prompts per step for as many steps as Training-Free GRPO takes:
equal rollouts). Every arm is evaluated through the same LLM interface on in-domain held-out problems and an
out-of-domain set: pass@1 at T=1 and greedy, with 95% Wilson intervals over problems; cost is rollouts,
tokens (policy and extractor) and wall time. The gradient arm needs weights: with --endpoint alone it is skipped.

CPU default: SFT a tiny Qwen2-style model (exrl's own, ~2M params) on 2-digit addition (75%) and subtraction
(25%); train on addition (in-domain), test subtraction out of domain. The tiny model is also the extractor (the paper uses
one LLM for both). It has never seen English, so it can neither write lessons nor read them; the `probe` arm
measures what a fixed, hand-written three-lesson library in its context does to it. See
docs/results/training_free_grpo.md for the numbers and their reading.
Runtime: 249 s on 2 CPU cores shared lightly, 705 s shared with other jobs (seed 0). Result (300 problems each,
pass@1 at T=1 / greedy, 95% CIs in the doc): base 0.603 / 0.910 in-domain, 0.073 / 0.083 out of domain;
training_free identical (the tiny extractor wrote no parseable lesson); grpo 0.633 / 0.900, 0.070 / 0.067.
The last stdout line is the JSON result, also in run_dir/results.json.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import tyro

from experiments import common
from exrl import cli
from exrl.curriculum.source import DatasetSource
from exrl.methods.training_free import (ExperienceLibrary, TrainingFreeConfig, TrainingFreeGRPO, evaluate_policy)
from exrl.rl.advantages import AdvantageConfig
from exrl.rl.losses import LossConfig
from exrl.rollout.sampler import SamplingConfig
from exrl.serve.llm import EndpointLLM, GenParams, LocalLLM
from exrl.tasks import MathDatasetTask, get_task
from exrl.tasks import pool as pool_lib
from exrl.train.evaluate import EvalConfig
from exrl.train.rl_loop import RLConfig, train_rl
from exrl.train.sft import SFTConfig, train_sft
from exrl.train.state import OptimConfig

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# What a strong extractor might write for 2-digit addition; the probe puts these in front of the tiny model.
PROBE_LESSONS = ("Add the ones digits first and carry 1 to the tens when the sum is 10 or more.",
                 "Then add the tens digits and the carry.",
                 "Write only the final number.")


@dataclasses.dataclass(frozen=True)
class Config:
  run_dir: str = "runs/training_free_grpo"
  seed: int = 0
  model: str = ""  # local HF directory: the policy in-process (and the gradient arm's weights)
  endpoint: str = ""  # OpenAI base URL of the policy (e.g. http://127.0.0.1:8000/v1); with --model, grpo uses --model
  endpoint_model: str = ""
  extractor_endpoint: str = ""  # the advantage extractor; default: the policy itself
  extractor_model: str = ""
  data: str = ""  # with --model / --endpoint: .jsonl / .json / .parquet; train split trains, eval split is in-domain
  ood_data: str = ""  # out-of-domain eval set (every row)
  question_field: str = "question"
  answer_field: str = "answer"
  instruction: str = INSTRUCTION
  train_problems: int = 48
  eval_problems: int = 300
  eval_samples: int = 1  # pass@1 samples per problem
  eval_max_tokens: int = 0  # 0: tf.rollout.max_tokens
  tf: TrainingFreeConfig = TrainingFreeConfig(
      run_dir="", epochs=3, batch_size=8, group_size=5, chat=False,
      rollout=GenParams(max_tokens=8, temperature=1.0), extractor=GenParams(max_tokens=48, temperature=0.0))
  grpo: bool = True
  rl: RLConfig = RLConfig(
      loss=LossConfig(kl_beta=0.005), advantage=AdvantageConfig(mode="grpo"),
      # lr 1e-5: quickstart's 1e-4 drove the KL to 0.66 and lost 19 points in these 18 steps (see the doc)
      optim=OptimConfig(lr=1e-5, warmup_frac=0.1, min_lr_ratio=0.1), checkpoint_every=1000)
  probe: bool = True  # CPU default only: base with PROBE_LESSONS in context
  tiny: common.TinyModel = common.TinyModel()
  tiny_positions: int = 2048  # the tiny model's context, so it can at least read the extractor prompts (RoPE)
  sft: SFTConfig = SFTConfig(steps=500, batch_size=64, checkpoint_every=500,
                             optim=OptimConfig(lr=1e-3, warmup_frac=0.05, min_lr_ratio=0.1))
  sft_examples: int = 16000
  sft_ood_fraction: float = 0.25  # share of subtraction in the tiny base's SFT data (the rest: addition)

  def __post_init__(self):
    if self.endpoint and not self.data:
      raise ValueError("--endpoint needs --data (the training and in-domain problems)")
    if self.model and not self.data:
      raise ValueError("--model needs --data (the training and in-domain problems)")
    for name in ("train_problems", "eval_problems", "eval_samples"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")


def tiny_setup(cfg: Config, run_dir: Path):
  """The CPU default: tokenizer, SFT base on +/- problems, and the problem sets."""
  add, sub = get_task("arithmetic", digits=2, ops="+"), get_task("arithmetic", digits=2, ops="-")
  tokenizer = common.build_tokenizer([add, sub], run_dir, seed=cfg.seed)
  model_config, params = common.init_model(cfg.tiny, tokenizer, cfg.seed)
  model_config = dataclasses.replace(model_config, max_position_embeddings=cfg.tiny_positions)
  n_sub = round(cfg.sft_examples * cfg.sft_ood_fraction)
  pairs = common.sft_pairs(add, cfg.sft_examples - n_sub, cfg.seed) + common.sft_pairs(sub, n_sub, cfg.seed)
  sft = dataclasses.replace(cfg.sft, run_dir=str(run_dir / "sft"), seed=cfg.seed)
  base = train_sft(sft, model_config, params, tokenizer, pairs).params
  sets = {"train": add.generate(cfg.train_problems, seed=cfg.seed + 10, split="train"),
          "in_domain": add.generate(cfg.eval_problems, seed=cfg.seed, split="eval"),
          "out_of_domain": sub.generate(cfg.eval_problems, seed=cfg.seed, split="eval")}
  return model_config, base, tokenizer, sets, add.verify


def data_setup(cfg: Config):
  """--data / --ood-data: math problems with the instruction appended (verified with math-verify)."""
  task = MathDatasetTask(cfg.data, cfg.question_field, cfg.answer_field)
  wrap = lambda ps: [dataclasses.replace(p, prompt=f"{p.prompt}\n{cfg.instruction}".strip()) for p in ps]
  sets = {"train": wrap(task.problems("train"))[:cfg.train_problems],
          "in_domain": wrap(task.problems("eval"))[:cfg.eval_problems]}
  if cfg.ood_data:
    sets["out_of_domain"] = wrap(MathDatasetTask(cfg.ood_data, cfg.question_field, cfg.answer_field)
                                 .problems())[:cfg.eval_problems]
  return sets, task.verify


def grpo_arm(cfg: Config, run_dir: Path, model_config, params, tokenizer, train, verify, encode, tf_steps: int):
  """Gradient GRPO with the same group size, prompts per step and steps (so rollouts) as Training-Free GRPO."""
  rl = dataclasses.replace(
      cfg.rl, run_dir=str(run_dir / "grpo"), seed=cfg.seed, steps=tf_steps, prompts_per_step=cfg.tf.batch_size,
      group_size=cfg.tf.group_size, sampling=SamplingConfig(max_new_tokens=cfg.tf.rollout.max_tokens,
                                                            temperature=cfg.tf.rollout.temperature))
  t0 = time.time()
  state, _ = train_rl(rl, model_config, params, tokenizer, DatasetSource(train, seed=cfg.seed), verify=verify,
                      encode=encode)
  wall = time.time() - t0
  steps = [json.loads(line) for line in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
  rows = rl.prompts_per_step * rl.group_size
  prompt_tokens = sum(len(encode(p.prompt)) for s in range(tf_steps)
                      for p in DatasetSource(train, seed=cfg.seed).batch(s, rl.prompts_per_step))
  cost = {"rollouts": tf_steps * rows, "policy_prompt_tokens": prompt_tokens,
          "policy_completion_tokens": round(sum(s["metrics"]["response_len"] for s in steps) * rows),
          "extractor_tokens": 0, "wall_s": round(wall, 1), "gradient_steps": tf_steps}
  return state.params, cost


def main(cfg: Config) -> dict:
  t_start = time.time()
  run_dir = Path(cfg.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  model_config = params = tokenizer = None
  tiny = not cfg.model and not cfg.endpoint
  log = lambda s: print(s, flush=True)
  if tiny:
    log("[tf-grpo] building the tiny base: tokenizer + SFT on 2-digit + and -")
    model_config, params, tokenizer, sets, verify = tiny_setup(cfg, run_dir)
  else:
    sets, verify = data_setup(cfg)
    if cfg.model:
      from exrl.models import hf
      from exrl.tokenizer import load_tokenizer
      tokenizer = load_tokenizer(cfg.model)
      model_config, params = hf.load(cfg.model)
  local = None if model_config is None else LocalLLM(model_config, params, tokenizer, name="base")
  policy = EndpointLLM(cfg.endpoint, cfg.endpoint_model) if cfg.endpoint else local
  extractor = (EndpointLLM(cfg.extractor_endpoint, cfg.extractor_model or cfg.endpoint_model)
               if cfg.extractor_endpoint else policy)
  chat = cfg.tf.chat if tiny else True
  encode = None if local is None else (
      (lambda s: local.encode(local.chat_text([{"role": "user", "content": s}]), templated=local.use_template))
      if chat else local.encode)
  pool = pool_lib.VerifierPool(timeout_s=5.0)
  eval_gen = GenParams(n=cfg.eval_samples, max_tokens=cfg.eval_max_tokens or cfg.tf.rollout.max_tokens,
                       temperature=1.0, seed=cfg.seed + 1)
  evals = {k: v for k, v in sets.items() if k != "train"}

  def evaluate_arm(name, llm, library):
    t0 = time.time()
    out = {k: evaluate_policy(llm, ps, verify, library, chat=chat, gen=eval_gen, pool=pool) for k, ps in evals.items()}
    log(f"[tf-grpo] {name}: " + ", ".join(f"{k} pass@1 {v['pass1']:.3f} greedy {v['greedy']:.3f}"
                                          for k, v in out.items()) + f" ({time.time() - t0:.0f} s)")
    return out

  try:
    results = {"base": {"eval": evaluate_arm("base", policy, ExperienceLibrary()), "cost": {"rollouts": 0}}}
    if tiny and cfg.probe:
      probe = ExperienceLibrary()
      for text in PROBE_LESSONS:
        probe.add(text)
      results["probe_fixed_lessons"] = {"eval": evaluate_arm("probe", policy, probe), "cost": {"rollouts": 0},
                                        "library": probe.state_dict()}

    log(f"[tf-grpo] Training-Free GRPO: {cfg.tf.epochs} epochs over {len(sets['train'])} problems, "
        f"G={cfg.tf.group_size}")
    tf_cfg = dataclasses.replace(cfg.tf, run_dir=str(run_dir / "training_free"), seed=cfg.seed, chat=chat)
    method = TrainingFreeGRPO(tf_cfg, policy, extractor, sets["train"], verify, pool=pool, log=log)
    library = method.run()
    st = method.stats
    results["training_free"] = {
        "eval": evaluate_arm("training_free", policy, library), "library": library.state_dict(),
        "cost": {"rollouts": st["rollouts"], "policy_prompt_tokens": st["policy_prompt_tokens"],
                 "policy_completion_tokens": st["policy_completion_tokens"],
                 "extractor_tokens": st["extractor_prompt_tokens"] + st["extractor_completion_tokens"],
                 "wall_s": round(st["wall_s"], 1), "gradient_steps": 0},
        "stats": {k: v for k, v in st.items() if k != "wall_s"}}

    if cfg.grpo and params is not None:
      log(f"[tf-grpo] gradient GRPO: {method.total_steps} steps x {cfg.tf.batch_size} prompts x G={cfg.tf.group_size}")
      grpo_params, cost = grpo_arm(cfg, run_dir, model_config, params, tokenizer, sets["train"], verify, encode,
                                   method.total_steps)
      results["grpo"] = {"eval": evaluate_arm("grpo", LocalLLM(model_config, grpo_params, tokenizer),
                                              ExperienceLibrary()), "cost": cost}
    elif cfg.grpo:
      results["grpo"] = {"skipped": "no weights: pass --model DIR (the endpoint's checkpoint) for the gradient arm"}
  finally:
    pool.close()

  print("\n" + table(results), flush=True)
  out = {"arms": results, "seed": cfg.seed, "train_problems": len(sets["train"]),
         "eval_problems": {k: len(v) for k, v in evals.items()}, "eval_samples": cfg.eval_samples,
         "policy": cfg.endpoint_model or cfg.model or "tiny", "runtime_s": round(time.time() - t_start, 1),
         "jax_backend": jax.default_backend()}
  common.write_result(run_dir, out)
  return out


def table(results: dict) -> str:
  """A markdown table: accuracy per eval set with 95% CIs, then cost."""
  sets = next(iter(results.values()))["eval"].keys()
  head = "| arm | " + " | ".join(f"{s} pass@1 [95% CI] | {s} greedy [95% CI]" for s in sets)
  lines = [head + " | rollouts | policy tokens | extractor tokens | wall s |",
           "|---|" + "---|---|" * len(sets) + "---|---|---|---|"]
  for name, r in results.items():
    if "eval" not in r:
      lines.append(f"| {name} | {r.get('skipped', '')} |")
      continue
    cells = [common.fmt_ci(r["eval"][s], k) for s in sets for k in ("pass1", "greedy")]
    c = r["cost"]
    policy_tokens = c.get("policy_prompt_tokens", 0) + c.get("policy_completion_tokens", 0)
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {c['rollouts']} | {policy_tokens} | "
                 f"{c.get('extractor_tokens', 0)} | {c.get('wall_s', 0)} |")
  return "\n".join(lines)


if __name__ == "__main__":
  cli.run(lambda: main(tyro.cli(Config)))
