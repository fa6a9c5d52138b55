"""GRPO-family RL on a local HF model and a local math dataset: the entry point for real work.

  python -m experiments.grpo intuitor --model /path/to/Qwen2.5-1.5B-Instruct --data train.jsonl

The first word picks a preset (`default` when left out; `python -m experiments.grpo intuitor --help`
shows its values); every flag after it overrides the preset. `--rl.reward verifier | self_certainty |
mix`: math-verify on the final answer, Intuitor's self-certainty (no labels used), or both normalised per
group and summed with `--rl.mix-weights`. The `intuitor` preset sets the published Intuitor
hyper-parameters (arXiv 2505.19590: lr 3e-6, group 7, KL β 0.005, 128 prompts, temperature 0.9, prompt 512 /
completion 3072 tokens). The `scalerl` preset turns on the ScaleRL recipe's switches (arXiv 2510.13786): CISPO,
prompt-level loss aggregation, batch-level advantage normalisation, zero-variance filtering, the FP32 LM head,
PipelineRL-8 (`--rl.max-lag 8`: asynchronous, at most 8 versions off-policy) and no positive resampling
(`--no-positive-resampling`: a prompt whose pass rate so far is >= 0.9 is never served again; that history is saved
in every checkpoint); the other values are the defaults.
Checkpoints, metrics.jsonl, TensorBoard events and eval.json go to `--rl.run-dir`; the final policy is
exported as an HF directory (`<run-dir>/hf`) that transformers or vLLM can load. Re-running the same
command resumes from the last checkpoint. `--help` lists every option.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Literal

import tyro

from exrl.curriculum.pass_rate import PassRateSource
from exrl.curriculum.source import DatasetSource, ProblemSource
from exrl.models import hf
from exrl.rl.advantages import AdvantageConfig
from exrl.rl.losses import LossConfig
from exrl.rollout.sampler import SamplingConfig
from exrl import cli
from exrl.tasks import MathDatasetTask
from exrl.tasks.math_data import drop_long_prompts
from exrl.tokenizer import load_tokenizer
from exrl.infra import distributed
from exrl.infra import lineage, runlock
from exrl.infra.checkpoint import export_hf
from exrl.infra.resources import peak_rss_mb
from exrl.models.peft_export import export_lora
from exrl.train.evaluate import EvalConfig
from exrl.train.rl_loop import RLConfig, train_rl
from exrl.train.state import OptimConfig

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass(frozen=True)
class Args:
  model: str = ""  # local HF checkpoint directory (config.json + *.safetensors + tokenizer files)
  data: str = ""  # local .jsonl / .json / .parquet with question and answer fields
  eval_data: str = ""  # a separate eval file, same format and fields as the training data; empty: a hash split of it
  question_field: str = "question"
  answer_field: str = "answer"
  max_prompt_tokens: int = 512  # longer prompts are dropped (and counted) at load
  chat_template: bool = True  # wrap questions in the tokenizer's chat template when it has one
  instruction: str = INSTRUCTION
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  compute_dtype: Literal["float32", "bfloat16"] = "float32"
  eval_problems: int = 200
  export: bool = True
  export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the input checkpoint's dtype
  positive_resampling: bool = True  # False: ScaleRL's no positive resampling, solved prompts are dropped for good
  pass_rate_threshold: float = 0.9  # without positive resampling: a prompt's pass rate so far at which it is dropped
  rl: RLConfig = RLConfig(run_dir="runs/grpo")
  distributed: distributed.DistributedConfig = distributed.DistributedConfig()  # multi-host: see exrl.infra.distributed

  def __post_init__(self):
    if self.eval_problems < 0:
      raise ValueError(f"--eval-problems={self.eval_problems} must be >= 0")
    if not 0 < self.pass_rate_threshold <= 1:
      raise ValueError(f"--pass-rate-threshold={self.pass_rate_threshold} must be in (0, 1]")
    if self.max_prompt_tokens < 1:
      raise ValueError(f"--max-prompt-tokens={self.max_prompt_tokens} must be >= 1")


PRESETS = {
    "default": ("small defaults that run on a CPU", Args()),
    "intuitor": ("Intuitor's published recipe (arXiv 2505.19590)", Args(
        max_prompt_tokens=512, param_dtype="float32", compute_dtype="bfloat16",
        rl=RLConfig(run_dir="runs/intuitor", steps=58, prompts_per_step=128, group_size=7, num_microbatches=8,
                    sampling=SamplingConfig(max_new_tokens=3072, temperature=0.9),
                    loss=LossConfig(kl_beta=0.005, clip_eps_low=0.2, clip_eps_high=0.2),
                    optim=OptimConfig(lr=3e-6, warmup_frac=0.1, min_lr_ratio=0.0),
                    eval=EvalConfig(batch_size=64, sampling=SamplingConfig(max_new_tokens=3072, temperature=0.9)),
                    checkpoint_every=10, remat=True, reward="self_certainty"))),
    "scalerl": ("ScaleRL's recipe switches (arXiv 2510.13786); other values as in default", Args(
        positive_resampling=False, pass_rate_threshold=0.9,
        rl=RLConfig(run_dir="runs/scalerl", loss=LossConfig(kind="cispo", aggregation="prompt"),
                    advantage=AdvantageConfig(mode="batch", filter_zero_variance=True), fp32_head=True,
                    max_lag=8))),
}


# Args fields a resume may change (exrl.infra.lineage); the rest, and any field added later, define the run.
_OBSERVE_ONLY = ("model", "data", "eval_problems", "export", "export_dtype", "distributed")


def make_source(args: Args, train) -> ProblemSource:
  """The training problems' source: epochs over the dataset, behind the pass-rate filter when asked."""
  source = DatasetSource(train, seed=args.rl.seed)
  return source if args.positive_resampling else PassRateSource(source, threshold=args.pass_rate_threshold)


def parse(argv: list[str]) -> Args:
  """`[PRESET] [flags]`: the preset (a tyro subcommand, `default` when omitted) and flags that override it."""
  if not argv or (argv[0] not in PRESETS and argv[0] not in ("-h", "--help")):
    argv = ["default", *argv]
  return tyro.extras.overridable_config_cli(PRESETS, args=argv, description=__doc__)


@runlock.holding(lambda args: args.rl.run_dir)  # one live launch per run dir, through the export
def main(args: Args) -> dict:
  """Check the flags, the tokenizer and the dataset first (seconds), then load the model (minutes)."""
  if not args.model or not args.data:
    raise ValueError("--model (a local HF directory) and --data (a local dataset file) are required")
  hf_config = hf.config_from_hf(hf.read_config_json(Path(args.model) / "config.json"))
  tokenizer = load_tokenizer(args.model)
  use_chat = args.chat_template and getattr(tokenizer, "has_chat_template", False)

  def to_text(question: str) -> str:
    content = f"{question}\n{args.instruction}".strip()
    if use_chat:
      return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return content + "\n"

  def encode(prompt_text: str) -> list[int]:  # the chat template already holds any bos
    return tokenizer.encode(prompt_text, add_bos=not use_chat and tokenizer.bos_id is not None)

  task = MathDatasetTask(args.data, args.question_field, args.answer_field)
  wrap = lambda ps: [dataclasses.replace(p, prompt=to_text(p.prompt)) for p in ps]
  # With --eval-data every row of --data trains; without it the hash split holds out a fixed share of --data.
  eval_task = MathDatasetTask(args.eval_data, args.question_field, args.answer_field) if args.eval_data else None
  train, dropped = drop_long_prompts(wrap(task.problems(None if eval_task else "train")), lambda t: len(encode(t)),
                                     args.max_prompt_tokens, args.data)
  eval_pool = eval_task.problems() if eval_task else task.problems("eval")
  evals = wrap(eval_pool)[:args.eval_problems]
  print(f"[grpo] eval set: {len(evals)} of {len(eval_pool)} problems from " +
        (f"{args.eval_data} (--eval-data); all of {args.data} trains" if eval_task else
         f"the hash split of {args.data} (eval_fraction={task.eval_fraction}; --eval-data FILE for a separate set)"),
        flush=True)
  prompt_len = max(len(encode(p.prompt)) for p in train + evals)
  longest = prompt_len + max(args.rl.sampling.max_new_tokens, args.rl.eval.sampling.max_new_tokens)
  if longest > hf_config.max_position_embeddings:
    raise ValueError(f"the longest prompt ({prompt_len} tokens) + max new tokens = {longest} exceeds the model's "
                     f"max_position_embeddings={hf_config.max_position_embeddings}; lower --max-prompt-tokens or "
                     f"--rl.sampling.max-new-tokens / --rl.eval.sampling.max-new-tokens")
  # The data file's bytes define the run (its path may move); the weights are fingerprinted by the trainer.
  lineage.declare(args.rl.run_dir, "experiment",
                  {**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name != "rl"},
                   "data_sha256": lineage.file_sha256(args.data),
                   **({"eval_data_sha256": lineage.file_sha256(args.eval_data)} if args.eval_data else {})},
                  observe_only=_OBSERVE_ONLY)
  config, params = hf.load(args.model, param_dtype=args.param_dtype, compute_dtype=args.compute_dtype)
  print(f"[grpo] {len(train)} train problems ({dropped} dropped as longer than {args.max_prompt_tokens} tokens); "
        f"model {args.model} ({config.model_type}, V={config.vocab_size}); reward={args.rl.reward}", flush=True)
  lora_cfg = dataclasses.replace(args.rl.lora, base_path=str(Path(args.model).resolve()))  # recorded in checkpoints
  # The trainer gets the only reference to the loaded weights (a LoRA run may hold its base as int8 / nf4 and
  # drop the rest); the LoRA export re-reads the base from disk, one tensor at a time.
  loaded = [params]
  del params
  state, result = train_rl(dataclasses.replace(args.rl, lora=lora_cfg), config, loaded.pop(), tokenizer,
                           make_source(args, train), eval_problems=evals, verify=task.verify, encode=encode)
  out = {"eval": {k: v for k, v in result.items() if k != "greedy_examples"}, "run_dir": args.rl.run_dir,
         "seed": args.rl.seed, "eval_problems": len(evals), "train_peak_rss_mb": round(peak_rss_mb())}
  if args.export:
    export_dir = Path(args.rl.run_dir) / "hf"
    export_dtype = (hf.saved_dtype(hf.read_config_json(Path(args.model) / "config.json"), config.param_dtype)
                    if args.export_dtype == "auto" else args.export_dtype)
    if lora_cfg.on:  # <run-dir>/hf merged (the base streamed from disk a tensor at a time), <run-dir>/peft
      dirs = export_lora(config, args.model, state.params, lora_cfg, args.rl.run_dir, dtype=export_dtype)
      out["export_peft"] = dirs["peft"]
    else:
      export_hf(config, state.params, export_dir, dtype=export_dtype)
    for f in Path(args.model).iterdir():  # tokenizer and generation files, so the export is servable as is
      if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
        shutil.copy2(f, export_dir / f.name)
    out["export"] = str(export_dir)
  out["peak_rss_mb"] = round(peak_rss_mb())  # the whole run's, export included (getrusage)
  print(f"[grpo] peak host RSS {out['peak_rss_mb']:,} MB (training {out['train_peak_rss_mb']:,} MB)", flush=True)
  (Path(args.rl.run_dir) / "result.json").write_text(json.dumps(out, indent=2))
  print(json.dumps(out), flush=True)
  return out


def _entry() -> dict:
  args = parse(sys.argv[1:])
  distributed.init(args.distributed)  # one process: a no-op; flags, EXRL_*, SLURM or a TPU pod otherwise
  return main(args)


if __name__ == "__main__":
  cli.run(_entry)
