"""Built-in text environments: determinism, hand-checked rules, and the scripted expert solves every seed."""
import pytest

from exrl.envs import ENVS, make_env
from exrl.envs.experts import run_expert
from exrl.envs.wordle import WORDS, WordleEnv, feedback


@pytest.mark.parametrize("name", sorted(ENVS))
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_expert_solves_every_instance(name, seed):
  env = make_env(name, seed=seed)
  for idx in range(150):
    traj = run_expert(env, idx)
    assert traj.done and traj.reward == 1.0, (name, seed, idx, traj.turns[-1])
    assert len(traj.turns) <= env.max_turns


def test_wordle_expert_solves_every_word():
  env = WordleEnv()
  for target in WORDS:
    env.reset(0)
    env.target = target  # every word, not only those the seeds happen to draw
    for _ in range(env.max_turns):
      _, action = env.expert_action()
      _, reward, done = env.step(action)
      if done:
        break
    assert reward == 1.0, target


@pytest.mark.parametrize("name", sorted(ENVS))
def test_deterministic_by_seed_and_index(name):
  a, b = make_env(name, seed=3), make_env(name, seed=3)
  assert [a.reset(i) for i in range(5)] == [b.reset(i) for i in range(5)]
  assert run_expert(a, 4).turns == run_expert(b, 4).turns
  if name != "wordle":  # wordle's instruction is the same text for every target
    assert len({a.reset(i) for i in range(20)}) > 10
  assert len({str(run_expert(a, i).turns) for i in range(20)}) > 10
  assert str(run_expert(make_env(name, seed=4), 0).turns) != str(run_expert(make_env(name, seed=3), 0).turns) or \
      str(run_expert(make_env(name, seed=4), 1).turns) != str(run_expert(make_env(name, seed=3), 1).turns)


def test_wordle_feedback_hand_examples():
  assert feedback("crane", "crane") == "GGGGG"
  assert feedback("about", "cycle") == "-----"
  assert feedback("allow", "about") == "G--Y-"   # one o in the target: marked once
  assert feedback("apple", "alarm") == "G--Y-"   # p absent twice, l elsewhere
  assert feedback("alarm", "apple") == "GY---"   # second a has no a left in the target
  env = WordleEnv()
  env.reset(0)
  obs, reward, done = env.step("zzzzz")
  assert "Not in the word list" in obs and reward == 0.0 and not done


def test_maze_illegal_move_is_an_ordinary_step():
  env = make_env("maze")
  for idx in range(50):
    env.reset(idx)
    blocked = [a for a in ("up", "down", "left", "right") if a not in env._open()]
    if blocked:
      pos = env.pos
      obs, reward, done = env.step(blocked[0])
      assert obs.startswith(f"Blocked {blocked[0]}.") and reward == 0.0 and not done and env.pos == pos
      obs, reward, done = env.step("jump")
      assert obs.startswith("Invalid action") and not done
      return
  pytest.fail("no maze instance with a blocked direction in 50")


def test_textcraft_rules():
  env = make_env("textcraft")
  env.reset(1)  # "make bow. Recipes: dye = ingot; ingot = ink + door; bow = cup + dye."
  assert env.goal == "bow" and env.recipes["ingot"] == ("ink", "door")
  assert env.step("craft ingot").observation.startswith("Cannot craft ingot: missing ink, door.")
  assert env.step("get bow").observation.startswith("Cannot get bow")
  assert env.step("get ink").observation == "Got ink. Inventory: ink."
  assert env.step("get door").observation == "Got door. Inventory: door, ink."
  assert env.step("craft ingot").observation == "Crafted ingot. Inventory: ingot."
  assert env.step("inventory") == ("Inventory: ingot.", 0.0, False)


def test_guards():
  env = make_env("maze")
  with pytest.raises(RuntimeError, match="before reset"):
    env.step("up")
  with pytest.raises(ValueError, match="data_idx"):
    env.reset(-1)
  with pytest.raises(ValueError, match="unknown env"):
    make_env("babyai")
  traj = run_expert(env, 0)
  assert traj.done and env.step("up") == ("The episode is over. Reset to start a new one.", 0.0, True)
