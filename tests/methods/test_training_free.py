"""Training-Free GRPO: library ops and checkpoints, robust reply parsing, resume, and a frozen in-process model."""
from __future__ import annotations

import dataclasses
import json
import re

import jax
import numpy as np
import pytest

from exrl.methods import training_free_prompts as P
from exrl.methods.training_free import (ExperienceLibrary, TrainingFreeConfig, TrainingFreeGRPO, evaluate_policy)
from exrl.serve.llm import Completion, GenParams, LocalLLM
from exrl.tasks import get_task
from exrl.train.evaluate import wilson_interval

TASK = get_task("arithmetic", digits=1, ops="+")


def _c(text: str) -> Completion:
  return Completion(text, 10, len(text.split()), "stop")


class FakePolicy:
  """Answers `a+b=` right on even (seed + sample) and wrong on odd: every group is informative."""
  name = "fake-policy"

  def __init__(self):
    self.prompts: list[str] = []

  def complete(self, prompts, gen):
    self.prompts += prompts
    out = []
    for p in prompts:
      a, b = map(int, re.findall(r"(\d+)\+(\d+)=$", p)[0])
      out.append([_c(str(a + b + (gen.seed + j) % 2)) for j in range(gen.n)])
    return out

  def chat(self, conversations, gen):
    return self.complete([c[-1]["content"] for c in conversations], gen)


class FakeExtractor:
  """Replies by prompt kind; `replies` maps a kind to a list of replies used in turn (cycled)."""
  name = "fake-extractor"

  def __init__(self, replies: dict[str, list[str]]):
    self.replies, self.calls = replies, {"summary": 0, "advantage": 0, "update": 0}

  def chat(self, conversations, gen):
    out = []
    for c in conversations:
      text = c[-1]["content"]
      kind = "summary" if "reviewing one attempt" in text else "advantage" if "Compare the better" in text else "update"
      options = self.replies[kind]
      out.append([_c(options[self.calls[kind] % len(options)])])
      self.calls[kind] += 1
    return out

  def complete(self, prompts, gen):
    raise AssertionError("the extractor is always asked in chat form")


GOOD = {"summary": ["added the digits and checked the result"],
        "advantage": ['Here you go:\n```json\n{"lessons": ["check the sum twice"]}\n```'],
        "update": ['[{"op": "add", "text": "check the sum twice"}]']}


def _cfg(tmp_path, **kw) -> TrainingFreeConfig:
  return TrainingFreeConfig(run_dir=str(tmp_path / "run"), epochs=2, batch_size=2, group_size=2, chat=False,
                            rollout=GenParams(max_tokens=4, temperature=1.0), **kw)


def test_library_ops_and_checkpoint_round_trip(tmp_path):
  from exrl.infra.checkpoint import Checkpointer

  lib = ExperienceLibrary(max_entries=3, max_chars=20)
  assert [lib.add("a"), lib.add("b  c")] == ["E0", "E1"]
  lib.delete("E0")
  assert lib.add("d") == "E2"  # ids are never reused
  lib.modify("E1", "b2")
  assert lib.apply({"op": "keep", "id": "E2"}) == "keep"
  lib.add("e")
  for bad in [{"op": "add", "text": "f"},  # full
              {"op": "delete", "id": "E0"}, {"op": "modify", "id": "E9", "text": "x"}, {"op": "add", "text": ""},
              {"op": "add", "text": "x" * 21}, {"op": "merge"}, "add", None, {"op": "keep"}]:
    with pytest.raises(ValueError):
      lib.apply(bad)
  assert lib.render() == "[E1] b2\n[E2] d\n[E3] e"
  with Checkpointer(tmp_path / "ckpt") as ck:
    ck.save(1, {"step": np.asarray(1, np.int32)}, {"library": lib.state_dict()}, force=True)
  with Checkpointer(tmp_path / "ckpt") as ck:
    _, meta = ck.restore()
  back = ExperienceLibrary(max_entries=3, max_chars=20)
  back.load_state_dict(meta["library"])
  assert back.entries == {"E1": "b2", "E2": "d", "E3": "e"} and back.next_id == 4
  with pytest.raises(ValueError, match="not an ExperienceLibrary state"):
    back.load_state_dict({"entries": "x"})


def test_run_updates_library_and_resumes_bit_for_bit(tmp_path):
  problems = TASK.generate(4, seed=0)
  cfg = _cfg(tmp_path)
  whole = TrainingFreeGRPO(cfg, FakePolicy(), FakeExtractor(GOOD), problems, TASK.verify, log=lambda s: None)
  whole.run()
  assert whole.stats["ops_add"] == whole.total_steps == 4 and whole.stats["informative_groups"] == 8
  assert list(whole.library.entries) == ["E0", "E1", "E2", "E3"]
  # The library is in every policy prompt after the first update.
  policy = FakePolicy()
  TrainingFreeGRPO(dataclasses.replace(cfg, run_dir=str(tmp_path / "half"), epochs=1), policy, FakeExtractor(GOOD),
                   problems, TASK.verify, log=lambda s: None).run()
  assert P.LESSON_HEADER not in policy.prompts[0] and "[E0] check the sum twice" in policy.prompts[-1]
  # Resume: two more epochs' worth on top of the 1-epoch run equals the uninterrupted 2-epoch run.
  resumed = TrainingFreeGRPO(dataclasses.replace(cfg, run_dir=str(tmp_path / "half")), FakePolicy(),
                             FakeExtractor(GOOD), problems, TASK.verify, log=lambda s: None)
  resumed.run()
  assert resumed.library.state_dict() == whole.library.state_dict()
  assert resumed.history == whole.history
  assert json.loads((tmp_path / "half" / "library.json").read_text()) == whole.library.state_dict()


@pytest.mark.parametrize("text", ["", "no json here", '{"lessons": "x"}', '{"lessons": [1, null, ""]}',
                                  '```json\n{"lessons": ["a"\n```', "[" * 5000, '{"other": ["a"]}', "null"],
                         ids=["empty", "prose", "not-a-list", "no-strings", "broken-fence", "deep", "no-key", "null"])
def test_parse_lessons_rejects_malformed(text):
  got, _ = P.parse_lessons(text, 3, 100)
  assert got is None or got == []


def test_parse_lessons_and_operations_accept_noisy_replies():
  assert P.parse_lessons('sure! {"lessons": ["a", 7, "b", "c", "d"]} hope that helps', 2, 100) == (["a", "b"], 3)
  assert P.parse_lessons('["x  y"]', 3, 100) == (["x y"], 0)
  assert P.parse_operations('```json\n{"operations": [{"op": "delete", "id": "E1"}]}\n```') == [
      {"op": "delete", "id": "E1"}]
  assert P.parse_operations("[oops") is None


def test_malformed_replies_are_counted_and_skipped(tmp_path):
  problems = TASK.generate(4, seed=1)
  bad = FakeExtractor({
      "summary": ["fine summary", "", "another summary", "fine"],  # one empty of every four
      "advantage": ["I think they were careful.", '{"lessons": ["carry the one"]}'],
      "update": ['[{"op": "delete", "id": "E99"}, {"op": "explode"}, "x", {"op": "add"}, '
                 '{"op": "add", "text": "carry the one"}]', "nothing useful"]})
  run = TrainingFreeGRPO(_cfg(tmp_path), FakePolicy(), bad, problems, TASK.verify, log=lambda s: None)
  run.run()
  st = run.stats
  assert st["summary_calls"] == 16 and st["summary_malformed"] == 4
  # A group whose surviving summaries all share one reward is not sent to the advantage step.
  assert st["advantage_calls"] == bad.calls["advantage"] and st["advantage_malformed"] == (bad.calls["advantage"] + 1) // 2
  assert st["update_calls"] == bad.calls["update"] and st["update_malformed"] == bad.calls["update"] // 2
  assert st["ops_add"] == (bad.calls["update"] + 1) // 2 and st["ops_invalid"] == 4 * st["ops_add"]
  assert len(run.library) == st["ops_add"]


def test_evaluate_policy_counts_against_numpy(tmp_path):
  problems = TASK.generate(6, seed=2)
  res = evaluate_policy(FakePolicy(), problems, TASK.verify, ExperienceLibrary(), chat=False,
                        gen=GenParams(n=4, max_tokens=4, seed=0))
  assert res["pass1"] == 0.5 and res["greedy"] == 1.0  # seed+j even is right: half the samples; greedy seed 0 right
  assert res["pass1_ci95"] == pytest.approx(wilson_interval(3, 6))


def odd_length_reward(text: str, problem) -> float:
  """A reward a random model earns half the time, so its groups reach the extractor (picklable for the pool)."""
  return float(len(text) % 2)


def test_frozen_model_params_bit_identical_after_a_run(tmp_path):
  from tests.serve.tiny_model import make_tiny_model_dir
  from exrl.serve.app import ServeConfig, load_llm

  served, _ = load_llm(ServeConfig(model=str(make_tiny_model_dir(tmp_path / "model"))))
  # pow2 prompt buckets: the extractor's prompts of many lengths compile a few shapes, not one per 16 tokens
  llm = LocalLLM(served.config, served.params, served.tokenizer, prompt_bucket="pow2")
  before = jax.tree.map(lambda x: np.array(x, copy=True), llm.params)
  cfg = dataclasses.replace(_cfg(tmp_path), epochs=1, extractor=GenParams(max_tokens=8, temperature=0.0))
  run = TrainingFreeGRPO(cfg, llm, llm, TASK.generate(2, seed=3), odd_length_reward, log=lambda s: None)
  run.run()
  assert run.stats["rollouts"] == 4 and run.stats["summary_calls"] > 0 and run.stats["extractor_prompt_tokens"] > 0
  same = jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b), before,
                      jax.tree.map(np.asarray, llm.params))
  assert all(jax.tree.leaves(same))
