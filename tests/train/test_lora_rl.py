"""A LoRA RL run: the state holds the adapter only, a run that dies mid-step and is resumed ends bitwise-identical
to one that did not, and a resume on a changed base is refused with a one-line error."""
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import common
from exrl import cli
from exrl.curriculum.source import TaskSource
from exrl.infra.metrics import deterministic_lines
from exrl.models import lora
from exrl.rl.losses import LossConfig
from exrl.rollout.sampler import SamplingConfig
from exrl.tasks import get_task
from exrl.train.rl_loop import RLConfig, train_rl
from exrl.train.state import OptimConfig
from tests.train.mini_rl import TINY

STEPS = 2  # the resumed run dies after step 1's checkpoint and runs step 2 alone
LORA = lora.LoraConfig(rank=4, alpha=8.0, base_dtype="nf4", base_path="tiny-random")


class Died(Exception):
  pass


class DyingSource(TaskSource):
  """Raises when asked for step `die_at`'s problems: the run dies after its checkpoint of step `die_at`."""

  def __init__(self, task, seed, die_at=None):
    super().__init__(task, seed=seed)
    self.die_at = die_at

  def batch(self, step, n):
    if step == self.die_at:
      raise Died(f"killed at step {step}")
    return super().batch(step, n)


def _run(run_dir: Path, die_at=None, params_delta=0.0, steps=STEPS):
  task = get_task("arithmetic", digits=1, ops="+")
  tokenizer = common.build_tokenizer([task], run_dir.parent / "tok", seed=0)
  config, params = common.init_model(TINY, tokenizer, 0)
  params = jax.tree.map(lambda x: x + params_delta, params)
  cfg = RLConfig(run_dir=str(run_dir), steps=steps, prompts_per_step=4, group_size=4, seed=0, lora=LORA,
                 sampling=SamplingConfig(max_new_tokens=4), loss=LossConfig(kl_beta=0.01),
                 optim=OptimConfig(lr=1e-2, warmup_frac=0.0, min_lr_ratio=1.0), checkpoint_every=1, keep_checkpoints=2)
  return train_rl(cfg, config, params, tokenizer, DyingSource(task, 0, die_at))[0]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("lora") / "straight"
  return run_dir, _run(run_dir)


def test_state_holds_the_adapter_only(straight):
  _, state = straight
  assert all("_lora_" in k for k in state.params["layers"]) and set(state.params) == {"layers"}
  adapter_size = lora.count(state.params)
  opt_size = lora.count(state.opt_state)
  assert 2 * adapter_size <= opt_size <= 2 * adapter_size + 8  # Adam's two moments (+ step counters)
  assert any(np.any(np.asarray(v)) for k, v in state.params["layers"].items() if k.endswith("_lora_b"))  # it trained


def test_killed_and_resumed_is_bitwise_identical(straight, tmp_path):
  straight_dir, straight_state = straight
  run_dir = tmp_path / "resumed"
  with pytest.raises(Died):
    _run(run_dir, die_at=1)
  resumed = _run(run_dir)
  for a, b in zip(jax.tree.leaves(straight_state), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert deterministic_lines(run_dir / "metrics.jsonl") == deterministic_lines(straight_dir / "metrics.jsonl")


def test_changed_base_is_refused_on_resume(straight, tmp_path):
  straight_dir, _ = straight
  with pytest.raises(ValueError, match="base model changed") as err:
    _run(straight_dir, params_delta=1e-3, steps=STEPS + 1)
  line = cli.user_error_message(err.value)
  assert "\n" not in line and "tiny-random" in line
