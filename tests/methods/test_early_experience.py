"""Early Experience: IWM and SR examples (tokens and masks) on hand-built trajectories against strings built by
hand, alternative picking, and branching that restores the exact state the expert saw (in process, over HTTP)."""
import copy

import pytest

from exrl.envs import make_env
from exrl.envs.client import EnvClient
from exrl.envs.experts import EnvTrajectory, run_expert
from exrl.methods.early_experience import EarlyExperienceConfig, pick_alternatives, repeat_to, restore, step_branches
from exrl.methods.early_experience_data import (Branch, first_sentence, iwm_examples, reflection_thought,
                                                sr_examples, state_ids)
from tests.envs.server_proc import running_server
from tests.rollout.test_multiturn import TOK

BOS, EOS = [TOK.bos_id], [TOK.eos_id]
enc = TOK.encode
TRAJ = EnvTrajectory("maze", 7, "Maze go", [("2 left, go up.", "up", "Moved up. At 0,1."),
                                            ("1 left, go right.", "right", "You reach the goal.")], 1.0, True)


def test_state_ids_hand_built():
  assert state_ids(TOK, TRAJ, 0) == BOS + enc("Maze go\n")
  assert state_ids(TOK, TRAJ, 1) == (BOS + enc("Maze go\n") + enc("Thought: 2 left, go up.\nAction: up") + EOS +
                                     enc("\nObservation: Moved up. At 0,1.\n"))


def test_iwm_examples_tokens_and_mask():
  b = Branch("maze", 7, 1, "Thought: hm\nAction: left", "left", "Blocked left. At 0,1.", 0.0, False)
  [(ids, mask)] = iwm_examples(TOK, [TRAJ], [b])
  state = state_ids(TOK, TRAJ, 1) + enc("Thought: hm\nAction: left") + EOS
  target = enc("\nObservation: Blocked left. At 0,1.\n")
  assert ids == state + target
  assert mask == [0] * len(state) + [1] * len(target)
  assert TOK.decode([i for i, m in zip(ids, mask) if m]) == "\nObservation: Blocked left. At 0,1.\n"


def test_sr_examples_tokens_mask_and_filtering():
  branches = [Branch("maze", 7, 0, "t", "left", "Blocked left. At 1,1; goal 0,2.", 0.0, False),
              Branch("maze", 7, 1, "t", "up", "You reach the goal.", 1.0, True),  # solved too: no reason, no example
              Branch("maze", 7, 1, "t", "down", "Moved down. At 1,1.", 0.0, False)]
  (ids0, mask0), (ids1, mask1) = sr_examples(TOK, [TRAJ], branches, threshold=0.99)
  rationale = "If left: Blocked left. 2 left, go up."
  assert reflection_thought("2 left, go up.", branches[0]) == rationale
  turn = enc(f"Thought: {rationale}\nAction: up") + EOS
  assert ids0 == BOS + enc("Maze go\n") + turn
  assert mask0 == [0] * (1 + len("Maze go\n")) + [1] * len(turn)
  turn = enc("Thought: If down: Moved down. 1 left, go right.\nAction: right") + EOS
  assert ids1 == state_ids(TOK, TRAJ, 1) + turn and mask1 == [0] * len(state_ids(TOK, TRAJ, 1)) + [1] * len(turn)


def test_first_sentence_and_pick_alternatives():
  assert first_sentence("Cannot craft bow: missing stick, string. Inventory: log.") == \
      "Cannot craft bow: missing stick, string."
  assert first_sentence("crane --GY-.") == "crane --GY-."
  assert first_sentence("no stop") == "no stop"
  samples = [("a", "up"), ("b", ""), ("c", "left"), ("d", "left"), ("e", "down"), ("f", "right")]
  assert pick_alternatives(samples, "up", 2) == [("c", "left"), ("e", "down")]
  assert pick_alternatives(samples, "right", 9) == [("a", "up"), ("c", "left"), ("e", "down")]


def test_repeat_to_counts():
  data = list(range(10))
  out = repeat_to(data, 2.3, seed=0)
  assert len(out) == 23 and sorted(out[:20]) == sorted(data * 2) and len(set(out[20:])) == 3
  with pytest.raises(ValueError, match="proposals"):
    EarlyExperienceConfig(branches=4, proposals=2)


ALTS = {"maze": ["left", "jump", "down"], "wordle": ["crane", "zzzzz", "about"], "textcraft": ["inventory", "get log"]}


def _snapshots(name):
  """An expert run with a deep copy of the env before every expert turn: the states reached directly."""
  env = make_env(name, seed=0)
  traj = run_expert(env, 3)
  env.reset(3)
  snaps = []
  for _, action, _ in traj.turns:
    snaps.append(copy.deepcopy(env))
    env.step(action)
  return traj, snaps


@pytest.mark.parametrize("name", ["maze", "wordle", "textcraft"])
def test_restore_equals_the_state_reached_directly(name):
  traj, snaps = _snapshots(name)
  env = make_env(name, seed=0)
  env.reset(11)
  env.step(ALTS[name][0])  # leave it elsewhere first: restore must not depend on what came before
  for i, snap in enumerate(snaps):
    assert restore(env, traj, i) == snap.observation()
    assert vars(env) == vars(snap)
  want = [copy.deepcopy(snaps[i]).step(a) for i in range(len(snaps)) for a in ALTS[name]]
  states = [(traj, i) for i in range(len(snaps))]
  got = step_branches(states, [[(f"Action: {a}", a) for a in ALTS[name]]] * len(snaps),
                      lambda n: make_env(n, seed=0))
  assert [(b.observation, b.reward, b.done) for b in got] == [tuple(w) for w in want]
  assert [(b.turn, b.action) for b in got] == [(i, a) for i in range(len(snaps)) for a in ALTS[name]]
  with pytest.raises(RuntimeError, match="expert saw"):  # another seed's instance is not the expert's state
    restore(make_env(name, seed=1), traj, len(snaps) - 1)


def test_fill_tops_up_with_legal_non_expert_actions():
  traj, snaps = _snapshots("maze")
  states = [(traj, i) for i in range(len(snaps))]
  got = step_branches(states, [[("t", "jump")]] + [[]] * (len(snaps) - 1), lambda n: make_env(n, seed=0), fill_to=2)
  assert got == step_branches(states, [[("t", "jump")]] + [[]] * (len(snaps) - 1), lambda n: make_env(n, seed=0),
                              fill_to=2)  # seeded
  for i, snap in enumerate(snaps):
    acts = [b.action for b in got if b.turn == i]
    legal = snap.available_actions()
    assert len(acts) == min(2, len(legal) - 1 + (i == 0)) and traj.turns[i][1] not in acts
    assert all(a in legal for a in acts[(i == 0):]) and len(set(acts)) == len(acts)


def test_branching_over_http_matches_in_process():
  trajs = {n: _snapshots(n) for n in ALTS}
  with running_server() as url:
    for name, (traj, snaps) in trajs.items():
      client = EnvClient(url, name)
      for i, snap in enumerate(snaps):
        assert restore(client, traj, i) == snap.observation()
        assert client.available_actions() == snap.available_actions()
      client.close()
      states = [(traj, i) for i in range(len(snaps))]
      alts = [[(a, a) for a in ALTS[name]]] * len(snaps)
      remote = step_branches(states, alts, lambda n: EnvClient(url, n))
      assert remote == step_branches(states, alts, lambda n: make_env(n, seed=0))
