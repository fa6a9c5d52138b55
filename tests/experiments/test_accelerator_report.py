"""experiments.accelerator_report: the --tiny run end to end on CPU, its time-box, running without the extras, and
the roofline / MFU / peak arithmetic against hand-computed numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from experiments import accel_env, accel_kernels, accelerator_report
from exrl.models import decoder
from exrl.models.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]
# vocab 100, D 8, MLP 16, 2 layers, 2 heads / 1 kv head of 4, qkv bias, tied embeddings.
SMALL = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                    head_dim=4, qkv_bias=True, tie_word_embeddings=True)


def test_param_count_by_hand_and_against_the_decoder():
  # per layer: q,k,v,o 8*4*(2*2+2*1)=192, qkv bias 4*(2+2)=16, MLP 3*8*16=384, two norms 16 -> 608;
  # 2 layers 1216 + embedding 100*8=800 + final norm 8 = 2024
  assert accel_env.param_count(SMALL) == 2024
  shapes = jax.eval_shape(lambda: decoder.init_params(SMALL, jax.random.key(0)))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 2024
  untied = SMALL.replace(tie_word_embeddings=False)
  assert accel_env.param_count(untied) == 2024 + 800
  assert accel_env.matmul_params(untied) == 2024  # the input embedding is a lookup, the separate head a matmul


def test_train_flops_and_mfu_by_hand():
  # dense 6 * 2024 * (3 * 10) = 364320; causal attention per sequence 3 (fwd+bwd) * 2 matmuls * 2 flops
  # * 2 heads * 4 dims * 10^2 / 2 * 2 layers = 9600, times 3 sequences = 28800
  assert accel_env.train_flops(SMALL, batch=3, seq_len=10) == 364320 + 28800
  assert accel_env.mfu(393120, 2.0, 1e6) == pytest.approx(0.19656)


def test_decode_roofline_by_hand():
  # weights 2024 params * 2 bytes = 4048; KV: K and V * 2 layers * 4 rows * 1 kv head * 4 dims * 10 positions
  # * 2 bytes = 1280 -> 5328 bytes per step
  assert accel_env.decode_step_bytes(SMALL, batch=4, context=10) == 5328
  # prompt 6 + 7 new tokens: mean context 6 + (7 + 1) / 2 = 10; 4 tokens per 5328 bytes at 1 MB/s
  assert accel_env.roofline_tokens_per_s(SMALL, 4, 6, 7, 1e6) == pytest.approx(4 * 1e6 / 5328)


@pytest.mark.parametrize("kind, peak", [("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("TPU v5 lite", 197e12), ("TPU v6 lite", 918e12), ("cpu", None)])
def test_peak_table(kind, peak):
  assert accel_env.peak_for(kind)["peak_bf16_flops"] == peak


def test_gpu_default_decision():
  xla = {"fwd_bwd_s": 1.0, "max_abs_err": {"logp": 1e-3, "dw": 1e-3}}
  fast = {"fwd_bwd_s": 0.5, "max_abs_err": {"logp": 1e-3, "dw": 5e-4}}
  assert accel_kernels.recommend_gpu_default({"xla": xla, "pallas_gpu[a]": fast})["recommendation"] == "pallas_gpu"
  slow = dict(fast, fwd_bwd_s=1.5)
  assert accel_kernels.recommend_gpu_default({"xla": xla, "pallas_gpu[a]": slow})["recommendation"] == "xla"
  wrong = dict(fast, max_abs_err={"logp": 0.5, "dw": 1e-3})
  assert accel_kernels.recommend_gpu_default({"xla": xla, "pallas_gpu[a]": wrong})["recommendation"] == "xla"
  assert accel_kernels.recommend_gpu_default({"xla": xla, "pallas_gpu[a]": {"error": "x"}})["recommendation"] == "xla"


def test_tiny_run_end_to_end(tmp_path, capsys):
  result = accelerator_report.main(accelerator_report.Config(tiny=True, out_dir=str(tmp_path)))
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result, default=float))
  assert json.loads((tmp_path / "result.json").read_text())["sections"].keys() == set(accelerator_report.SECTIONS)
  secs = result["sections"]
  assert {k: v["status"] for k, v in secs.items()} == {k: "ok" for k in accelerator_report.SECTIONS}
  impls = secs["token_stats"]["implementations"]
  assert {"reference", "xla", "pallas"} < impls.keys() and any(k.startswith("pallas_gpu") for k in impls)
  for name, row in impls.items():  # every fused path agrees with the materialised logits (fp32 on CPU)
    if name != "reference":
      assert max(row["max_abs_err"].values()) < 1e-4, (name, row)
  par = secs["parity"]["result"]
  assert par["exrl_fp32_highest_precision_vs_torch_fp32"] < 1e-4
  assert par["exrl_bf16_argmax_agree"] > 0.9
  batch = secs["sampler"]["result"]["batches"]["4"]
  assert batch["static"]["tokens_per_s"] > 0 and batch["hf_generate"]["tokens_per_s"] > 0
  assert batch["static"]["fraction_of_roofline"] > 0 and "continuous" in secs["sampler"]["result"]["engines_not_built"]
  rl = secs["rl_step"]["result"]
  assert set(rl["compile_s"]) == set(rl["steady_stage_s"]) == {"sample", "score", "reward", "update"}
  assert rl["update_mfu_vs_timed_matmul"] > 0
  report = (tmp_path / "report.md").read_text()
  assert "plumbing check" in report and "## RL step (GRPO)" in report


def test_out_of_budget_sections_are_recorded_as_skipped(tmp_path):
  cfg = accelerator_report.Config(tiny=True, out_dir=str(tmp_path), total_budget_s=1.0)
  result = accelerator_report.main(cfg)
  assert all(v["status"].startswith("skipped") for v in result["sections"].values())
  assert json.loads((tmp_path / "result.json").read_text())["sections"] == result["sections"]


def test_runs_without_tyro_or_other_extras(tmp_path):
  # An accelerator image ships jax, flax, optax, orbax, chex, transformers, torch, sentencepiece, numpy, tqdm:
  # block the extras this environment has, then run the env section through the argparse fallback.
  blocked = ["tyro", "matplotlib", "tensorboardX", "pandas", "openai", "fastapi", "uvicorn", "pytest"]
  code = (f"import sys\nclass Block:\n  def find_spec(self, name, path=None, target=None):\n"
          f"    if name.split('.')[0] in {blocked!r}:\n      raise ImportError('blocked: ' + name)\n"
          "sys.meta_path.insert(0, Block())\nimport runpy\n"
          f"sys.argv = ['accelerator_report', '--tiny', '--sections', 'env', '--out-dir', {str(tmp_path)!r}]\n"
          "runpy.run_module('experiments.accelerator_report', run_name='__main__')\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert list(result["sections"]) == ["env"] and result["sections"]["env"]["status"] == "ok"


def test_watchdog_ends_an_overrunning_section_and_keeps_the_result(tmp_path):
  # A section that sleeps past the budget: the process exits 3 after total_budget_s + grace_s, result.json says why.
  code = ("import time\nfrom experiments import accelerator_report as ar\nar.MIN_START_S = 0.0\n"
          "ar.RUNNERS['env'] = lambda run, put, deadline: (put('started', True), time.sleep(60))\n"
          f"ar.main(ar.Config(tiny=True, out_dir={str(tmp_path)!r}, total_budget_s=1.0, grace_s=1.0, "
          "sections=('env',)))\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 3, proc.stderr[-3000:]
  result = json.loads((tmp_path / "result.json").read_text())
  assert "'env'" in result["killed_by_watchdog"] and result["sections"]["env"]["started"] is True
  assert "Killed by the watchdog" in (tmp_path / "report.md").read_text()
