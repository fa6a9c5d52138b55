"""train_rl with a rollout worker: k = 0 never enters the async loop, and forced through it equals the synchronous
loop bitwise across a kill and resume; k > 0 in the deterministic schedule logs the lags the schedule fixes, and a
resumed run restarts generation from the checkpointed params; a rollout mesh split samples and trains where it says."""
import json

import jax
import numpy as np
import pytest

from exrl.curriculum.source import TaskSource
from exrl.infra import mesh as mesh_lib
from exrl.infra.checkpoint import Checkpointer
from exrl.infra.mesh import MeshConfig
from exrl.infra.metrics import deterministic_lines
from exrl.train import async_rl, rl_loop
from exrl.train.collect import groups
from tests.train import mini_rl


def _metrics(run_dir, field="metrics"):
  return [json.loads(line)[field] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_deterministic_async_run_and_resume(tmp_path):
  kw = dict(max_lag=2, async_schedule="deterministic", stale="rescore")
  straight = tmp_path / "straight"
  mini_rl.run(str(straight), steps=4, **kw)
  m = _metrics(straight)
  assert [x["lag/mean"] for x in m] == [0, 1, 2, 2]  # batch s is sampled by version max(0, s - 2)
  assert all(x["async/rescored_groups"] == 0 and x["lag/over_frac"] == 0 for x in m)
  for x in _metrics(straight, "timing"):
    assert 0 <= x["trainer_idle_frac"] <= 1 and 0 <= x["generator_idle_frac"] <= 1
  resumed = tmp_path / "resumed"
  mini_rl.run(str(resumed), steps=2, **kw)
  mini_rl.run(str(resumed), steps=4, **kw)  # resumes at step 2; rollouts in flight were not saved
  r = _metrics(resumed)
  assert deterministic_lines(resumed / "metrics.jsonl")[:2] == deterministic_lines(straight / "metrics.jsonl")[:2]
  assert [x["lag/mean"] for x in r] == [0, 1, 0, 1]  # generation restarted from the checkpoint's params (version 2)


STEPS = 4


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory):
  """The synchronous loop's run (max_lag = 0 must not enter the async loop) and its final params."""
  def refuse(*args, **kwargs):
    raise AssertionError("max_lag=0 entered the async loop")
  run_dir = tmp_path_factory.mktemp("sync") / "run"
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(rl_loop, "train_async", refuse)
    state, _ = mini_rl.run(str(run_dir), steps=STEPS, max_lag=0)
  return run_dir, jax.device_get(state.params)


@pytest.mark.slow
def test_max_lag_0_is_the_synchronous_loop(sync_run):
  m = _metrics(sync_run[0])
  assert len(m) == STEPS and not any(k.startswith(("lag/", "async/")) for x in m for k in x)
  assert not any("trainer_idle_frac" in t for t in _metrics(sync_run[0], "timing"))


class _KilledAtStep2(TaskSource):
  """A source whose step-2 draw (in the rollout worker) fails once: the run dies with a rollout in flight."""
  fired = False

  def batch(self, step, n):
    if step == 2 and not _KilledAtStep2.fired:
      _KilledAtStep2.fired = True
      raise RuntimeError("killed")
    return super().batch(step, n)


@pytest.mark.slow
def test_k0_through_the_worker_equals_the_synchronous_loop_bitwise_across_a_kill(sync_run, tmp_path, monkeypatch):
  ref_dir, ref_params = sync_run
  monkeypatch.setattr(rl_loop, "uses_worker", lambda cfg: True)  # max_lag = 0 through the worker, on the same mesh
  monkeypatch.setattr(mini_rl, "TaskSource", _KilledAtStep2)
  run_dir = tmp_path / "run"
  with pytest.raises(async_rl.WorkerError, match="failed at step 2: RuntimeError: killed"):
    mini_rl.run(str(run_dir), steps=STEPS)
  assert len(_metrics(run_dir)) == 2
  state, _ = mini_rl.run(str(run_dir), steps=STEPS)  # resumes at step 2; the worker restarts from the checkpoint
  assert all("trainer_idle_frac" in t for t in _metrics(run_dir, "timing"))  # the worker's loop ran
  assert deterministic_lines(run_dir / "metrics.jsonl") == deterministic_lines(ref_dir / "metrics.jsonl")
  with Checkpointer(run_dir / "ckpt") as ckpt:
    final, _ = ckpt.restore(STEPS)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(final["params"]), ref_params)  # bitwise


@pytest.mark.slow
def test_rollout_mesh_split(sync_run, tmp_path, monkeypatch):
  """rollout_devices=4 on 8 devices: generation on the last 4, training on the first 4; at k = 0 the run equals the
  8-device synchronous run: sampled tokens (and so every count) exactly, floats up to the all-reduce's order."""
  ref_dir, ref_params = sync_run
  sample_devices = []
  real_generate = groups.generate
  def recording(*args, **kwargs):
    out = real_generate(*args, **kwargs)
    sample_devices.append(out.tokens_BxN.sharding.device_set)
    return out
  monkeypatch.setattr(groups, "generate", recording)
  state, _ = mini_rl.run(str(tmp_path / "split"), steps=STEPS, mesh=MeshConfig(rollout_devices=4))
  rollout, train = set(jax.devices()[4:]), set(jax.devices()[:4])
  assert sample_devices == [rollout] * STEPS
  assert all(leaf.sharding.device_set == train for leaf in jax.tree.leaves(state.params))
  got, want = _metrics(tmp_path / "split"), _metrics(ref_dir)
  assert got[0] == want[0]  # the first update's inputs are identical: so are its metrics, bitwise
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for k in ("response_len", "accuracy", "reward_mean"):
      assert g[k] == w[k], k
    np.testing.assert_allclose([g[k] for k in sorted(g)], [w[k] for k in sorted(w)], rtol=1e-4, atol=1e-9)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), jax.device_get(state.params),
               ref_params)
  with pytest.raises(ValueError, match=r"rollout_devices=8 must be in \[1, 7\]"):
    mesh_lib.make_mesh(MeshConfig(rollout_devices=8))
