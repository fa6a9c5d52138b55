"""A resume under a config that changes the experiment is refused naming each field; observe-only changes and
overridden changes are recorded in config.json's history, and the run continues."""
import dataclasses
import json

import jax
import pytest

from exrl import cli
from exrl.infra import lineage
from exrl.infra.mesh import MeshConfig
from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.rl.advantages import AdvantageConfig
from exrl.rl.losses import LossConfig
from exrl.rollout.sampler import SamplingConfig
from exrl.train.evaluate import EvalConfig
from exrl.train.rl_loop import RLConfig
from exrl.train.sft import SFTConfig, train_sft
from exrl.train.state import OptimConfig
from exrl.train.trainer import config_json

TINY = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                   head_dim=8)
RL = RLConfig(steps=10, prompts_per_step=4, group_size=4)


def _record(run_dir, cfg, model=TINY, fingerprint="f0"):
  return lineage.make_record(run_dir, config_json(cfg), config_json(model), fingerprint)


def _resume(run_dir, cfg, *, allow=False, model=TINY, fingerprint="f0", step=5):
  """The check open_run makes before resuming `run_dir` from checkpoint `step` under `cfg`."""
  rec = _record(run_dir, cfg, model, fingerprint)
  pending = lineage.check(run_dir, rec, lineage.observe_only(run_dir, type(cfg).__name__), resume_step=step,
                          allow=allow, flag="--rl.allow-config-change")
  lineage.commit(run_dir, rec, pending, step)


def _started(tmp_path, cfg=RL):
  lineage.commit(tmp_path, _record(tmp_path, cfg), None, 0)
  return json.loads((tmp_path / "config.json").read_text())


DEFINING = [  # (changed config, the path the refusal must name, old, new)
    (dataclasses.replace(RL, reward="self_certainty"), "reward", '"verifier"', '"self_certainty"'),
    (dataclasses.replace(RL, optim=OptimConfig(lr=1e-3)), "optim.lr", "1e-05", "0.001"),
    (dataclasses.replace(RL, group_size=8), "group_size", "4", "8"),
    (dataclasses.replace(RL, prompts_per_step=8), "prompts_per_step", "4", "8"),
    (dataclasses.replace(RL, seed=1), "seed", "0", "1"),
    (dataclasses.replace(RL, loss=LossConfig(kind="cispo")), "loss.kind", '"ppo"', '"cispo"'),
    (dataclasses.replace(RL, loss=LossConfig(kl_beta=0.1)), "loss.kl_beta", "0.0", "0.1"),
    (dataclasses.replace(RL, advantage=AdvantageConfig(mode="drgrpo")), "advantage.mode", '"grpo"', '"drgrpo"'),
    (dataclasses.replace(RL, sampling=SamplingConfig(max_new_tokens=32, temperature=0.7)), "sampling.temperature",
     "1.0", "0.7"),
    (dataclasses.replace(RL, inner_epochs=2), "inner_epochs", "1", "2"),
    (dataclasses.replace(RL, num_microbatches=2), "num_microbatches", "1", "2"),
    (dataclasses.replace(RL, eval=EvalConfig(sampling=SamplingConfig(max_new_tokens=8))), "eval.sampling.max_new_tokens",
     "32", "8"),  # what an eval measures is not its size or cadence
]


@pytest.mark.parametrize("new,path,old_v,new_v", DEFINING, ids=[d[1] for d in DEFINING])
def test_each_experiment_defining_rl_field_is_refused_naming_it(tmp_path, new, path, old_v, new_v):
  before = _started(tmp_path)
  with pytest.raises(lineage.ConfigChangedError) as e:
    _resume(tmp_path, new)
  msg = cli.user_error_message(e.value)
  assert f"{path}: {old_v} -> {new_v}" in msg and "\n" not in msg and "--rl.allow-config-change" in msg
  assert msg.count(" -> ") == 1  # only the changed field is listed
  assert json.loads((tmp_path / "config.json").read_text()) == before  # nothing recorded


def test_a_changed_model_or_changed_initial_weights_is_refused(tmp_path):
  _started(tmp_path)
  with pytest.raises(lineage.ConfigChangedError, match=r"model\.hidden_size: 16 -> 32"):
    _resume(tmp_path, RL, model=dataclasses.replace(TINY, hidden_size=32))
  with pytest.raises(lineage.ConfigChangedError, match='params: "f0" -> "f1"'):
    _resume(tmp_path, RL, fingerprint="f1")


def test_the_issues_three_flags_are_refused_in_one_line(tmp_path):
  _started(tmp_path)
  new = dataclasses.replace(RL, reward="self_certainty", optim=OptimConfig(lr=1e-3), group_size=8)
  with pytest.raises(lineage.ConfigChangedError) as e:
    _resume(tmp_path, new)
  msg = cli.user_error_message(e.value)
  assert "group_size: 4 -> 8, optim.lr: 1e-05 -> 0.001, reward: \"verifier\" -> \"self_certainty\"" in msg
  assert "checkpoint step 5" in msg and str(tmp_path) in msg


OBSERVE = [
    (dataclasses.replace(RL, steps=30), "steps"),
    (dataclasses.replace(RL, eval_every=5), "eval_every"),
    (dataclasses.replace(RL, eval=EvalConfig(samples_per_problem=4, batch_size=16)), "eval.samples_per_problem"),
    (dataclasses.replace(RL, checkpoint_every=2), "checkpoint_every"),
    (dataclasses.replace(RL, keep_checkpoints=5), "keep_checkpoints"),
    (dataclasses.replace(RL, mesh=MeshConfig(data=2, fsdp=4)), "mesh.data"),
    (dataclasses.replace(RL, run_dir="elsewhere/spelled"), "run_dir"),
]


@pytest.mark.parametrize("new,path", OBSERVE, ids=[o[1] for o in OBSERVE])
def test_each_observe_only_rl_field_is_accepted_and_recorded(tmp_path, new, path):
  _started(tmp_path)
  _resume(tmp_path, new, step=5)
  saved = json.loads((tmp_path / "config.json").read_text())
  first, entry = saved["lineage"]["history"]
  assert first["step"] == 0 and entry["step"] == 5 and entry["override"] is False
  assert path in entry["changed"] and entry["config"]["config"] == config_json(new)
  assert {k: v for k, v in saved.items() if k != "lineage"} == config_json(new)  # the top level is current


def test_sft_fields(tmp_path):
  sft = SFTConfig(steps=4, batch_size=8)
  _started(tmp_path, sft)
  for new, path in [(dataclasses.replace(sft, batch_size=16), "batch_size"),
                    (dataclasses.replace(sft, max_len=32), "max_len"),
                    (dataclasses.replace(sft, optim=OptimConfig(lr=1e-3)), "optim.lr")]:
    with pytest.raises(lineage.ConfigChangedError, match=f"{path}: "):
      _resume(tmp_path, new)
  _resume(tmp_path, dataclasses.replace(sft, steps=8, checkpoint_every=2))  # extended: accepted


def test_no_change_adds_no_entry_and_a_field_new_to_the_code_is_recorded_not_refused(tmp_path):
  saved = _started(tmp_path)
  _resume(tmp_path, RL)
  _resume(tmp_path, dataclasses.replace(RL, restart=True))  # launch flags: neither compared nor recorded
  _resume(tmp_path, dataclasses.replace(RL, allow_config_change=True))
  assert len(json.loads((tmp_path / "config.json").read_text())["lineage"]["history"]) == 1
  del saved["pack_width"]  # as if written by a version without the field
  (tmp_path / "config.json").write_text(json.dumps(saved))
  _resume(tmp_path, RL, step=7)
  entry = json.loads((tmp_path / "config.json").read_text())["lineage"]["history"][-1]
  assert entry["step"] == 7 and entry["changed"] == {"pack_width": ["<absent>", RL.pack_width]}


def test_config_json_written_before_lineage_is_the_runs_start(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(config_json(RL)))  # the old format: the config alone
  with pytest.raises(lineage.ConfigChangedError, match="group_size: 4 -> 8"):
    _resume(tmp_path, dataclasses.replace(RL, group_size=8))
  _resume(tmp_path, RL)  # model and weights were not recorded then: recorded now, nothing refused
  history = json.loads((tmp_path / "config.json").read_text())["lineage"]["history"]
  assert [h["step"] for h in history] == [0, 5] and "model.hidden_size" in history[1]["changed"]


def test_declared_sections_define_the_run_with_their_own_observe_only_fields(tmp_path):
  lineage.declare(tmp_path, "experiment", {"data_sha256": "aa", "eval_problems": 10}, observe_only=("eval_problems",))
  _started(tmp_path)
  lineage.declare(tmp_path, "experiment", {"data_sha256": "aa", "eval_problems": 50}, observe_only=("eval_problems",))
  _resume(tmp_path, RL)
  lineage.declare(tmp_path, "experiment", {"data_sha256": "bb", "eval_problems": 50}, observe_only=("eval_problems",))
  with pytest.raises(lineage.ConfigChangedError, match='experiment.data_sha256: "aa" -> "bb"'):
    _resume(tmp_path, RL)


def test_params_fingerprint_tells_weights_apart_but_not_their_placement():
  p = decoder.init_params(TINY, jax.random.key(0))
  q = decoder.init_params(TINY, jax.random.key(1))
  sharded = jax.device_put(p, jax.sharding.NamedSharding(jax.make_mesh((8,), ("d",)), jax.sharding.PartitionSpec()))
  assert lineage.params_fingerprint(p) == lineage.params_fingerprint(sharded) != lineage.params_fingerprint(q)


# ---- through train_sft (open_run) -----------------------------------------------------------------------------

class _Tok:
  vocab_size, eos_id = 64, 2

  def encode(self, s, add_bos=False):
    return [1] * add_bos + [3 + ord(c) % 60 for c in s]


def test_sft_refuses_before_set_up_and_continues_under_the_override_with_history(tmp_path, monkeypatch):
  pairs = [(f"{i}+{i}=", str(2 * i)) for i in range(8)]
  params = decoder.init_params(TINY, jax.random.key(0))
  cfg = SFTConfig(run_dir=str(tmp_path), steps=2, batch_size=8, max_len=16, checkpoint_every=1)
  train_sft(cfg, TINY, params, _Tok(), pairs)
  longer = dataclasses.replace(cfg, steps=4, optim=dataclasses.replace(cfg.optim, lr=1e-2))
  from exrl.train import trainer
  monkeypatch.setattr(trainer, "_open_run", lambda *a, **k: pytest.fail("set up before the lineage check"))
  with pytest.raises(lineage.ConfigChangedError, match=r"optim\.lr: 0\.003 -> 0\.01") as e:
    train_sft(longer, TINY, params, _Tok(), pairs)
  assert "--sft.allow-config-change" in str(e.value) and "steps" not in str(e.value)
  other = decoder.init_params(TINY, jax.random.key(1))  # e.g. --model pointing at other weights of one shape
  with pytest.raises(lineage.ConfigChangedError, match="params: "):
    train_sft(cfg, TINY, other, _Tok(), pairs)
  monkeypatch.undo()
  train_sft(dataclasses.replace(longer, allow_config_change=True), TINY, params, _Tok(), pairs)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  history = json.loads((tmp_path / "config.json").read_text())["lineage"]["history"]
  assert [(h["step"], h.get("override")) for h in history] == [(0, None), (2, True)]
  assert history[1]["changed"] == {"optim.lr": [3e-3, 1e-2], "steps": [2, 4]}
  assert history[0]["config"]["config"]["optim"]["lr"] == 3e-3  # the start config is kept
