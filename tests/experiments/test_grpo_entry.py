"""experiments.grpo end to end on a tiny local HF model + HF tokenizer + jsonl dataset, and its presets."""
import json

import jax
import numpy as np
import torch
import transformers

from experiments import grpo
from exrl.models import decoder, hf
from tests.models.hf_fixtures import make_hf_model
from tests.test_tokenizer import CHAT_TEMPLATE, _save_hf_tokenizer


def test_intuitor_preset_and_overrides(capsys):
  args = grpo.parse(["intuitor", "--model", "m", "--data", "d", "--rl.steps", "3"])
  rl = args.rl
  assert (rl.reward, rl.steps) == ("self_certainty", 3)
  assert (rl.optim.lr, rl.group_size, rl.prompts_per_step, rl.loss.kl_beta) == (3e-6, 7, 128, 0.005)
  assert (rl.sampling.temperature, rl.sampling.max_new_tokens, args.max_prompt_tokens) == (0.9, 3072, 512)
  assert grpo.parse(["intuitor", "--rl.reward", "mix"]).rl.reward == "mix"  # a flag overrides the preset
  assert grpo.parse(["--model", "m", "--data", "d", "--rl.reward", "mix"]).rl.reward == "mix"  # default preset
  assert grpo.parse([]).rl.reward == "verifier"
  import pytest
  with pytest.raises(SystemExit) as e:  # tyro reports a bad value as a usage error, exit status 2
    grpo.parse(["--eval-problems", "-3"])
  assert e.value.code == 2 and "--eval-problems=-3 must be >= 0" in capsys.readouterr().err


def test_every_option_appears_once_in_help():
  """One flag surface: --help lists each option once, with its default."""
  import contextlib
  import io
  import re

  import pytest

  for argv in (["default", "--help"], ["intuitor", "--help"]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
      grpo.parse(argv)
    flags = re.findall(r"(--[a-z][a-z0-9.-]*)", buf.getvalue())
    dupes = {f for f in flags if flags.count(f) > 1 and f != "--help"}
    assert not dupes and "--rl.reward" in flags and "--reward" not in flags, dupes


def test_grpo_on_local_hf_model_and_dataset(tmp_path):
  model_dir = tmp_path / "model"
  _save_hf_tokenizer(model_dir, chat_template=CHAT_TEMPLATE)
  make_hf_model("qwen2", model_dir, vocab_size=384)
  rng = np.random.default_rng(0)
  with open(tmp_path / "train.jsonl", "w") as f:
    for _ in range(60):
      a, b = rng.integers(0, 50, 2)
      f.write(json.dumps({"q": f"What is {a}+{b}?", "a": f"{a}+{b}={a + b}\n#### {a + b}"}) + "\n")
  run_dir = tmp_path / "run"
  args = grpo.parse(["--model", str(model_dir), "--data", str(tmp_path / "train.jsonl"), "--question-field", "q",
                     "--answer-field", "a", "--rl.reward", "mix", "--eval-problems", "4", "--rl.run-dir", str(run_dir),
                     "--rl.steps", "2", "--rl.prompts-per-step", "2", "--rl.group-size", "4",
                     "--rl.sampling.max-new-tokens", "8", "--rl.eval.sampling.max-new-tokens", "8", "--rl.eval.batch-size", "4"])
  out = grpo.main(args)
  assert out["eval"]["n"] == 4 and 0 <= out["eval"]["pass1"] <= 1
  rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(v) for r in rows for v in r["metrics"].values())
  # The export is a servable HF directory: transformers loads model and tokenizer, and its logits are exrl's.
  export = run_dir / "hf"
  tok = transformers.AutoTokenizer.from_pretrained(export)
  model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
  config, params = hf.load(export)
  ids = tok("What is 3+4?")["input_ids"]
  with torch.no_grad():
    theirs = model(torch.tensor([ids])).logits.numpy()
  ours = np.asarray(decoder.logits(config, params, jax.numpy.asarray([ids])))
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
