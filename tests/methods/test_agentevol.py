"""AgentEvol pieces: success filtering with per-item dedup, the multi-turn GRPO collector's rows and
advantages against a numpy formula, and end-to-end runs (RL loop with the collector; the experiment)."""
import json

import jax
import numpy as np
import pytest

from exrl.envs.protocol import StepResult
from exrl.rl.advantages import AdvantageConfig
from exrl.rl.losses import LossConfig
from exrl.rollout.multiturn import MultiTurnConfig, Trajectory
from exrl.methods.agentevol import AgentEvolConfig, build_env, expert_examples, keep_successes
from exrl.train.collect.multiturn import EnvProblem, MultiTurnCollector
from exrl.train.rl_loop import RLConfig
from exrl.train.state import OptimConfig
from tests.rollout.test_multiturn import TINY, TOK


def _traj(env, idx, texts, reward):
  return Trajectory(env, idx, [1, 5, 6], [0, 1, 1], [0.0, -1.0, -1.0], [(t, "", "") for t in texts], reward, True)


def test_keep_successes_threshold_and_dedup_per_item():
  seen = set()
  a = _traj("maze", 0, ["go up"], 1.0)
  kept = keep_successes([a, _traj("maze", 0, ["go up"], 1.0),  # same item, same turns: a duplicate
                         _traj("maze", 0, ["go left"], 1.0),  # same item, other turns: kept
                         _traj("maze", 1, ["go up"], 1.0),  # same turns, other item: kept
                         _traj("wordle", 0, ["go up"], 1.0),  # other env: kept
                         _traj("maze", 2, ["x"], 0.99)], 0.99, seen)  # not above the threshold
  assert len(kept) == 4 and kept[0] == (a.tokens, a.agent_mask)
  assert keep_successes([_traj("maze", 0, ["go left"], 1.0)], 0.99, seen) == []  # seen in an earlier round


def test_env_kwargs_reach_every_env_and_bad_specs_fail():
  cfg = AgentEvolConfig(env_seed=3, env_kwargs=("maze:size=3", "textcraft:max_depth=1", "maze:wall_frac=0.1"))
  maze, craft, wordle = (build_env(cfg, n) for n in ("maze", "textcraft", "wordle"))
  assert (maze.size, maze.wall_frac, maze.seed, craft.max_depth, wordle.seed) == (3, 0.1, 3, 1, 3)
  assert build_env(AgentEvolConfig(), "maze").size == 5  # no spec: the env's own default
  for bad in ("maze size=3", "chess:size=3", "maze:=3", "maze:size=three", "maze:depth=2", "maze:size=1"):
    with pytest.raises(ValueError, match="env_kwargs|maze size"):
      AgentEvolConfig(env_kwargs=(bad,))


def test_wordle_num_words_restricts_targets_and_guesses():
  from exrl.envs.experts import run_expert
  from exrl.envs.wordle import WORDS
  env = build_env(AgentEvolConfig(env_kwargs=("wordle:num_words=20",)), "wordle")
  trajs = [run_expert(env, i) for i in range(60)]
  assert all(t.reward == 1.0 and t.turns[-1][1] in WORDS[:20] for t in trajs)  # the expert solves each
  assert len({t.turns[-1][1] for t in trajs}) > 10
  env.reset(0)
  assert env.step(WORDS[20]).observation.startswith("Not in the word list")  # legal in the full game only


def test_expert_data_uses_env_kwargs():
  from exrl.envs import make_env
  from exrl.envs.experts import run_expert
  from exrl.rollout.multiturn import agent_text, trajectory_ids
  cfg = AgentEvolConfig(envs=("maze",), env_seed=1, expert_per_env=2, env_kwargs=("maze:size=3",))
  env = make_env("maze", seed=1, size=3)
  want = [trajectory_ids(TOK, tr.instruction, [(agent_text(t, a), o) for t, a, o in tr.turns])
          for tr in (run_expert(env, 0), run_expert(env, 1))]
  assert expert_examples(TOK, cfg) == want  # size-5 mazes (kwargs ignored) would differ



def test_expert_counts_override_per_env_and_bad_specs_fail():
  from exrl.methods.agentevol import expert_count
  cfg = AgentEvolConfig(envs=("maze", "wordle"), expert_per_env=2, expert_counts=("wordle=3",),
                        env_kwargs=("maze:size=3",))
  assert (expert_count(cfg, "maze"), expert_count(cfg, "wordle"), expert_count(cfg, "textcraft")) == (2, 3, 2)
  only = lambda env, n: expert_examples(TOK, AgentEvolConfig(envs=(env,), expert_per_env=n, env_kwargs=cfg.env_kwargs))
  assert expert_examples(TOK, cfg) == only("maze", 2) + only("wordle", 3)  # instances [0, N) of each env
  for bad in ("wordle:3", "chess=3", "wordle=three", "wordle=-1"):
    with pytest.raises(ValueError, match="expert_counts"):
      AgentEvolConfig(expert_counts=(bad,))
  with pytest.raises(ValueError, match="iteration_lr"):
    AgentEvolConfig(iteration_lr=-1e-3)


class SlotEnv:
  """A one-turn env whose reward is its construction order mod 2, so groups of 2 get rewards 0 and 1."""
  name, max_turns, made = "slot", 1, [0]

  def __init__(self):
    self.k = SlotEnv.made[0]
    SlotEnv.made[0] += 1

  def reset(self, idx):
    return f"slot {idx}"

  def step(self, action):
    return StepResult("ok", float(self.k % 2), True)


def _rl_cfg(tmp_path, **kw):
  return RLConfig(run_dir=str(tmp_path / "rl"), steps=2, prompts_per_step=2, group_size=2,
                  loss=LossConfig(kl_beta=0.0),
                  advantage=AdvantageConfig(mode="grpo"), optim=OptimConfig(lr=1e-3, warmup_frac=0.0),
                  checkpoint_every=1, **kw)


def test_collector_rows_and_advantages(tmp_path):
  config = TINY.config(136, TOK)
  params = jax.tree.map(np.asarray, __import__("exrl.models.decoder", fromlist=["x"]).init_params(config, jax.random.key(0)))
  SlotEnv.made[0] = 0
  col = MultiTurnCollector(_rl_cfg(tmp_path), config, TOK, lambda n: SlotEnv(), MultiTurnConfig(max_len=64))
  exp = col.collect(params, params, [EnvProblem("slot", 3), EnvProblem("slot", 4)], jax.random.key(1))
  r = exp.rows
  assert r["tokens"].shape == (4, 64)
  np.testing.assert_array_equal(exp.traces["reward"], [0, 1, 0, 1])
  want_adv = np.asarray([-1, 1, -1, 1]) * 0.5 / (np.std([0, 1], ddof=1) + 1e-6)  # (r - mean) / (std + eps)
  np.testing.assert_allclose(r["adv"], want_adv, rtol=1e-5)
  np.testing.assert_array_equal(r["group_id"], [0, 0, 1, 1])
  prompt_len = len(TOK.encode("slot 3\n", add_bos=True))
  for b in range(4):
    n = int(r["valid"][b].sum())
    assert r["loss_mask"][b, :prompt_len].sum() == 0 and r["loss_mask"][b, n:].sum() == 0
    assert r["loss_mask"][b, prompt_len:n].all() and exp.traces["length"][b] == n - prompt_len
    assert np.all(r["old_logp"][b, prompt_len:n] < 0) and np.all(r["old_logp"][b, n:] == 0)
  col.close()


def test_multiturn_grpo_through_the_rl_loop(tmp_path):
  from exrl.models import decoder
  from exrl.methods.agentevol import multiturn_grpo
  config = TINY.config(136, TOK)
  params = decoder.init_params(config, jax.random.key(0))
  state = multiturn_grpo(_rl_cfg(tmp_path), config, params, TOK, ["maze", "wordle"], instances_per_env=4,
                         rollout_cfg=MultiTurnConfig(max_new_tokens=6, max_turns=2, max_len=384))
  lines = [json.loads(l) for l in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2]
  assert all(np.isfinite(l["metrics"]["loss"]) and l["metrics"]["num_tokens"] > 0 for l in lines)
  assert all(any(k.startswith("success/") for k in l["metrics"]) for l in lines)
  assert int(state.step) == 2


@pytest.mark.slow
def test_experiment_end_to_end(tmp_path):
  from experiments import agentevol as exp
  from exrl.methods.agentevol import AgentEvolConfig
  from exrl.train.sft import SFTConfig
  cfg = exp.Config(run_dir=str(tmp_path / "ae"), ks=(1,), model=TINY, vocab_size=320,
                   evol=AgentEvolConfig(envs=("maze", "textcraft"), expert_per_env=6, explore_per_env=4,
                                        eval_per_env=3, iterations=1, sft_epochs=1.0, iteration_lr=1e-4,
                                        sft=SFTConfig(batch_size=8, max_len=512),
                                        rollout=MultiTurnConfig(max_new_tokens=16, max_turns=3, max_len=512),
                                        rollout_batch=8))
  out = exp.main(cfg)
  assert set(out["results"]) == {"BC", "K=1 M=1"}
  assert out["results"]["BC"]["maze"]["n"] == 3
  it = out["iterations"]["K=1"][0]
  assert it["data"] == 12 + it["kept"]
  assert (tmp_path / "ae" / "success_vs_m.png").exists() and (tmp_path / "ae" / "table.md").exists()
  lr = lambda name: json.loads((tmp_path / "ae" / "K1" / name / "config.json").read_text())["optim"]["lr"]
  assert (lr("bc"), lr("iter1")) == (cfg.evol.sft.optim.lr, 1e-4)  # the iteration starts at iteration_lr
