"""`python -m experiments.grpo scalerl`: the preset turns on every ScaleRL switch, and they reach the trainer.

The switches' own numpy oracles: CISPO and prompt aggregation in tests/rl/test_losses.py, batch-level advantage
normalisation and zero-variance filtering in tests/rl/test_advantages.py, the FP32 LM head in
tests/train/test_fp32_head.py, no positive resampling in tests/curriculum/test_pass_rate.py.
"""
import dataclasses
from pathlib import Path

import pytest

from experiments import common, grpo
from exrl.curriculum.pass_rate import PassRateSource, problem_key
from exrl.curriculum.source import DatasetSource
from exrl.rollout.sampler import SamplingConfig
from exrl.tasks import get_task
from exrl.tasks.base import Problem
from exrl.train import rl_loop
from exrl.infra.checkpoint import Checkpointer
from exrl.train.evaluate import EvalConfig
from exrl.infra.mesh import MeshConfig
from exrl.train.state import OptimConfig
from tests.train.mini_rl import TINY

SOLVED_PROMPTS = 4  # the verifier below passes every response to the first 4 problems of the pool


def test_scalerl_preset_sets_every_switch():
  args = grpo.parse(["scalerl", "--model", "m", "--data", "d"])
  rl = args.rl
  assert rl.loss.kind == "cispo"
  assert rl.loss.aggregation == "prompt"
  assert rl.advantage.mode == "batch"
  assert rl.advantage.filter_zero_variance
  assert rl.fp32_head
  assert rl.max_lag == 8  # PipelineRL-8
  assert not args.positive_resampling and args.pass_rate_threshold == 0.9
  src = grpo.make_source(args, [_problem(i) for i in range(3)])
  assert isinstance(src, PassRateSource) and src.threshold == 0.9 and isinstance(src.inner, DatasetSource)
  # None of them is on by default, and each can be turned off again after the preset.
  plain = grpo.parse([])
  assert (plain.rl.loss.kind, plain.rl.loss.aggregation, plain.rl.advantage.mode) == ("ppo", "token_mean", "grpo")
  assert not plain.rl.advantage.filter_zero_variance and not plain.rl.fp32_head and plain.positive_resampling
  assert isinstance(grpo.make_source(plain, [_problem(0)]), DatasetSource)
  off = grpo.parse(["scalerl", "--positive-resampling", "--rl.no-fp32-head", "--rl.loss.kind", "ppo"])
  assert off.positive_resampling and not off.rl.fp32_head and off.rl.loss.kind == "ppo"
  assert grpo.parse(["scalerl", "--pass-rate-threshold", "0.75"]).pass_rate_threshold == 0.75


def test_bad_pass_rate_threshold_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as e:
    grpo.parse(["scalerl", "--pass-rate-threshold", "1.5"])
  assert e.value.code == 2 and "--pass-rate-threshold=1.5 must be in (0, 1]" in capsys.readouterr().err


def _problem(i):
  return Problem(prompt=f"{i}+0=", answer=str(i), task="arithmetic")


def solves_the_first_problems(response: str, problem) -> float:
  del response
  return float(int(problem.prompt.split("+")[0]) < SOLVED_PROMPTS)


def test_scalerl_run_takes_the_switches_and_checkpoints_the_pass_rates(tmp_path, monkeypatch):
  """train_rl with the preset's RLConfig on a bf16 model and a data=4 x tensor=2 mesh: the loss gets the FP32
  head and the mesh (vocab-parallel statistics), solved prompts are served once and then never again, and the
  pass-rate history in the checkpoint equals the source's; a resumed run restores it."""
  seen = []

  def spy(*a, **kw):
    seen.append(kw)
    return real(*a, **kw)

  real = rl_loop.rl_loss_fn
  monkeypatch.setattr(rl_loop, "rl_loss_fn", spy)
  task = get_task("arithmetic", digits=1, ops="+")
  tokenizer = common.build_tokenizer([task], tmp_path, seed=0)
  config, params = common.init_model(TINY, tokenizer, 0)
  config = dataclasses.replace(config, compute_dtype="bfloat16")
  pool = [_problem(i) for i in range(8)]
  run_dir = str(tmp_path / "run")
  preset = grpo.PRESETS["scalerl"][1]
  cfg = dataclasses.replace(preset.rl, run_dir=run_dir, steps=3, prompts_per_step=4, group_size=4,
                            mesh=MeshConfig(data=-1, fsdp=1, tensor=2), sampling=SamplingConfig(max_new_tokens=4),
                            optim=OptimConfig(lr=1e-3, warmup_frac=0.0), checkpoint_every=1, keep_checkpoints=1,
                            eval=EvalConfig(batch_size=8, sampling=SamplingConfig(max_new_tokens=4)),
                            max_lag=0)  # synchronous: a worker k steps ahead draws before the pass-rate feedback

  def source():
    return grpo.make_source(dataclasses.replace(preset, rl=cfg), pool)

  src = source()
  rl_loop.train_rl(cfg, config, params, tokenizer, src, verify=solves_the_first_problems)
  assert seen[-1]["fp32_head"] is True and seen[-1]["mesh"].shape["tensor"] == 2
  solved = {problem_key(p) for p in pool[:SOLVED_PROMPTS]}
  assert src.dropped and src.dropped <= solved
  for key, (passes, attempts) in src.history.items():
    if key in solved:  # served once (one group), dropped, never served again
      assert (passes, attempts) == (cfg.group_size, cfg.group_size)
    else:
      assert passes == 0 and attempts % cfg.group_size == 0
  _, meta = Checkpointer(Path(run_dir) / "ckpt", keep=1).restore()
  assert meta["source"] == src.state_dict()

  resumed = source()
  rl_loop.train_rl(dataclasses.replace(cfg, steps=4), config, params, tokenizer, resumed,
                   verify=solves_the_first_problems)
  assert resumed.draw > src.draw and resumed.dropped >= src.dropped
  assert all(resumed.history[k][1] >= v[1] for k, v in src.history.items())


def test_scalerl_help_lists_each_option_once():
  import contextlib
  import io
  import re

  buf = io.StringIO()
  with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
    grpo.parse(["scalerl", "--help"])
  flags = re.findall(r"(--[a-z][a-z0-9.-]*)", buf.getvalue())
  dupes = {f for f in flags if flags.count(f) > 1 and f != "--help"}
  assert not dupes and "--no-positive-resampling" in flags and "--rl.fp32-head" in flags, dupes
