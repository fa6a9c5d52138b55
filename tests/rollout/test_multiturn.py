"""Multi-turn ReAct rollouts: the agent-token mask against a hand-built example, the rollout's tokens
against an env replay and a decoder re-score, and identical rollouts in-process and over HTTP."""
import chex
import jax
import numpy as np
import pytest

from experiments import common
from exrl.envs import make_env
from exrl.envs.client import EnvClient
from exrl.models import decoder
from exrl.rollout.multiturn import (MultiTurnConfig, instruction_text, observation_text, parse_action, rollout,
                                    trajectory_ids)
from tests.envs.server_proc import running_server


class CharTokenizer:
  """One token per character of code point < 133 (id = ord + 3); pad 0, bos 1, eos 2."""
  pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 136
  stop_ids = (2,)

  def encode(self, text, add_bos=False, add_eos=False):
    return [1] * add_bos + [ord(c) + 3 for c in text] + [2] * add_eos

  def decode(self, ids, skip_special=True):
    return "".join(chr(i - 3) for i in ids if i >= 3)


TOK = CharTokenizer()
TINY = common.TinyModel(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64)


@pytest.fixture(scope="module")
def model():
  config = TINY.config(136, TOK)
  return config, decoder.init_params(config, jax.random.key(0))


def test_mask_hand_built():
  ids, mask = trajectory_ids(TOK, "go", [("Thought: x\nAction: up", "ok"), ("Thought: y\nAction: down", "end")])
  #              bos  "go\n"   agent turn 1 + eos                 "\nObservation: ok\n"   agent turn 2 + eos
  want_text = "^" + "go\n" + "Thought: x\nAction: up" + "$" + "\nObservation: ok\n" + "Thought: y\nAction: down" + "$"
  want_mask = "0" + "000" + "1" * 21 + "1" + "0" * 17 + "1" * 23 + "1"
  got_text = "".join("^" if i == 1 else "$" if i == 2 else chr(i - 3) for i in ids)
  assert got_text == want_text
  assert "".join(map(str, mask)) == want_mask
  assert len(ids) == len(mask) == 1 + 3 + 22 + 17 + 24


def test_parse_action():
  assert parse_action("Thought: hm\nAction: go left \nmore") == "go left"
  assert parse_action("Action:up") == "up"
  assert parse_action("no action here") == ""


def _spans(mask):
  """(start, end, value) runs of a 0/1 list."""
  out, start = [], 0
  for s in range(1, len(mask) + 1):
    if s == len(mask) or mask[s] != mask[start]:
      out.append((start, s, mask[start]))
      start = s
  return out


def test_rollout_mask_covers_exactly_agent_tokens(model):
  config, params = model
  envs = [make_env(n) for n in ("maze", "wordle", "textcraft", "maze")]
  cfg = MultiTurnConfig(max_new_tokens=12, max_turns=3, max_len=1024)
  trajs = rollout(config, params, TOK, envs, [0, 1, 2, 3], jax.random.key(1), cfg)
  for tr in trajs:
    replay = make_env(tr.env)
    env_side = TOK.encode(instruction_text(replay.reset(tr.idx)), add_bos=True)
    for t, (_, action, obs) in enumerate(tr.turns):
      assert replay.step(action).observation == obs
      if t + 1 < len(tr.turns):
        env_side += TOK.encode(observation_text(obs))
    ids, mask = np.asarray(tr.tokens), np.asarray(tr.agent_mask)
    assert ids[mask == 0].tolist() == env_side  # everything off the mask is instruction + observations
    agent_spans = [(a, b) for a, b, v in _spans(tr.agent_mask) if v == 1]
    assert len(agent_spans) == len(tr.turns) == 3
    for (a, b), (text, action, _) in zip(agent_spans, tr.turns):
      assert TOK.decode(ids[a:b].tolist()) == text and parse_action(text) == action
      assert b - a <= cfg.max_new_tokens
    # The sampler's log-probs sit on the agent tokens: check against a full decoder re-score.
    logits = decoder.logits(config, params, ids[None])[0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    s = np.flatnonzero(mask)
    chex.assert_trees_all_close(np.asarray(tr.logp)[s], np.asarray(logp[s - 1, ids[s]]), atol=2e-4)
    assert np.all(np.asarray(tr.logp)[mask == 0] == 0)


def test_rollout_identical_in_process_and_over_http(model):
  config, params = model
  names, idx = ("maze", "wordle", "textcraft"), [4, 5, 6]
  cfg = MultiTurnConfig(max_new_tokens=10, max_turns=3, temperature=1.0)
  local = rollout(config, params, TOK, [make_env(n) for n in names], idx, jax.random.key(3), cfg)
  with running_server() as url:
    remote_envs = [EnvClient(url, n) for n in names]
    remote = rollout(config, params, TOK, remote_envs, idx, jax.random.key(3), cfg)
    for e in remote_envs:
      e.close()
  for a, b in zip(local, remote):
    assert (a.tokens, a.agent_mask, a.turns, a.reward, a.done) == (b.tokens, b.agent_mask, b.turns, b.reward, b.done)
    chex.assert_trees_all_close(np.asarray(a.logp), np.asarray(b.logp))
  assert len({str(t.turns) for t in local}) == 3
