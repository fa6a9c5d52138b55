"""Full fine-tuning whose loss and collector never read the reference keeps no copy of the loaded weights: the
train state's is the only one (a params-sized tree less); with the KL monitor on, the loaded tree is the reference
and stays alive."""
import gc
import weakref

import jax
import pytest

from experiments import common
from exrl.curriculum.source import TaskSource
from exrl.rollout.sampler import SamplingConfig
from exrl.tasks import get_task
from exrl.train.rl_loop import RLConfig, train_rl
from tests.train.mini_rl import TINY


class WatchingSource(TaskSource):
  """Records, at each step, whether the loaded weights (watched through a weak reference) are still alive."""

  def __init__(self, task, watched):
    super().__init__(task, seed=0)
    self.watched, self.alive = watched, []

  def batch(self, step, n):
    gc.collect()
    self.alive.append(self.watched() is not None)
    return super().batch(step, n)


@pytest.mark.parametrize("kl_monitor", [False, True])
def test_unused_reference_is_freed(tmp_path, kl_monitor):
  task = get_task("arithmetic", digits=1, ops="+")
  tokenizer = common.build_tokenizer([task], tmp_path / "tok", seed=0)
  config, params = common.init_model(TINY, tokenizer, 0)
  source = WatchingSource(task, weakref.ref(params["layers"]["wq"]))
  cfg = RLConfig(run_dir=str(tmp_path / "run"), steps=1, prompts_per_step=2, group_size=2, seed=0,
                 sampling=SamplingConfig(max_new_tokens=4), kl_monitor=kl_monitor, checkpoint_every=1)
  loaded = [params]
  del params
  state, _ = train_rl(cfg, config, loaded.pop(), tokenizer, source)
  assert source.alive == [kl_monitor]
  assert jax.tree.leaves(state.params)[0].shape  # the run trained on its own copy
