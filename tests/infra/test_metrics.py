"""MetricsWriter (JSONL + TensorBoard), resume truncation, progress bar, PNG plots."""

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from exrl.infra import plot
from exrl.infra.metrics import MetricsWriter, ProgressBar, deterministic_lines, read_jsonl

REPO = Path(__file__).resolve().parents[2]


def _step_metrics(step: int) -> dict:
  """Deterministic metrics of a fake run, mixing jax, numpy and python scalars."""
  rng = np.random.default_rng(step)
  return {
      "reward": {"mean": jnp.float32(rng.random()), "std": np.float64(rng.random())},
      "acc": jnp.asarray(rng.random(), dtype=jnp.bfloat16),
      "len": np.int32(100 + step),
      "timeouts": jnp.int32(step % 2),
      "skipped": np.bool_(step == 3),
      "kl": 1e-3 * step,
      "grad_norm": jnp.float32(np.nan if step == 3 else step),  # a skipped non-finite step
  }


def _expected(step: int) -> dict:
  """Independent oracle: the python values the JSON line must hold."""
  rng = np.random.default_rng(step)
  r_mean, r_std, acc = rng.random(), rng.random(), rng.random()
  return {"reward/mean": float(np.float32(r_mean)), "reward/std": r_std,
          "acc": float(np.asarray(acc).astype(jnp.bfloat16).astype(np.float64)),
          "len": 100 + step, "timeouts": step % 2, "skipped": int(step == 3), "kl": 1e-3 * step,
          "grad_norm": np.nan if step == 3 else float(step)}


def _canon(obj) -> str:
  return json.dumps(obj, sort_keys=True)


def _read_tb_scalars(tb_dir: Path, purges: list | None = None) -> dict[str, dict[int, float]]:
  """Parses TFRecord event files by hand: u64 length, u32 crc, Event proto, u32 crc.

  Applies TensorBoard's purge rule: a session START at step p drops earlier events at steps >= p.
  """
  scalars: dict[str, dict[int, float]] = {}
  paths = sorted(tb_dir.glob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[-1]))
  for path in paths:
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        if purges is not None:
          purges.append(event.step)
        for tag in scalars:
          scalars[tag] = {s: v for s, v in scalars[tag].items() if s < event.step}
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_jsonl_lines_hold_python_scalars_and_tensorboard_has_them(tmp_path):
  with MetricsWriter(tmp_path) as writer:
    for step in (1, 2, 3):
      writer.write(step, _step_metrics(step), timing={"tokens_per_s": jnp.float32(1000.0 + step)})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 3
  for step, line in zip((1, 2, 3), lines):
    record = json.loads(line)
    assert record["step"] == step
    assert _canon(record["metrics"]) == _canon(_expected(step))  # strings: NaN == NaN
    assert all(type(v) in (int, float) for v in record["metrics"].values())
    assert set(record["timing"]) == {"time", "elapsed_s", "tokens_per_s"}
  assert type(json.loads(lines[0])["metrics"]["len"]) is int
  tb = _read_tb_scalars(tmp_path / "tb")
  assert tb["reward/mean"] == pytest.approx({s: _expected(s)["reward/mean"] for s in (1, 2, 3)})
  assert tb["len"] == {1: 101.0, 2: 102.0, 3: 103.0}
  assert tb["timing/tokens_per_s"] == {1: 1001.0, 2: 1002.0, 3: 1003.0}


def test_bad_metric_values_fail_with_name(tmp_path):
  with MetricsWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(ValueError, match="'loss' must be a scalar"):
      writer.write(1, {"loss": np.ones(3)})
    with pytest.raises(TypeError, match="'name' must be numeric"):
      writer.write(1, {"name": "abc"})
    writer.write(2, {"x": 1.0})
    with pytest.raises(ValueError, match="step=1 is before the last logged step=2"):
      writer.write(1, {"x": 1.0})


def test_resume_truncates_to_checkpoint_step_and_matches_straight_run(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  with MetricsWriter(straight) as writer:
    for step in range(1, 7):
      writer.write(step, _step_metrics(step), timing={"step_s": 0.1})
  # run killed after logging step 5 (and mid-way through a line), last checkpoint at step 3
  with MetricsWriter(resumed) as writer:
    for step in range(1, 6):
      writer.write(step, _step_metrics(step), timing={"step_s": 0.2})
  with open(resumed / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "metr')
  with MetricsWriter(resumed, resume_step=3) as writer:
    assert [r["step"] for r in read_jsonl(resumed / "metrics.jsonl")] == [1, 2, 3]
    for step in range(4, 7):
      writer.write(step, _step_metrics(step), timing={"step_s": 0.3})
  want = read_jsonl(straight / "metrics.jsonl", deterministic=True)
  got = read_jsonl(resumed / "metrics.jsonl", deterministic=True)
  assert _canon(got) == _canon(want) and len(got) == 6
  assert deterministic_lines(resumed / "metrics.jsonl") == deterministic_lines(
      straight / "metrics.jsonl")
  assert _canon([r["metrics"] for r in want]) == _canon([_expected(s) for s in range(1, 7)])
  # the non-deterministic part differs, so it is really excluded from the comparison
  assert read_jsonl(resumed / "metrics.jsonl") != read_jsonl(straight / "metrics.jsonl")
  # TensorBoard: two event files (killed, resumed); with the purge at step 4 the killed run's
  # steps 4-5 are dropped and the scalars read as the straight run's
  assert len(list((resumed / "tb").glob("events.out.tfevents.*"))) == 2
  purges = []
  tb_resumed, tb_straight = _read_tb_scalars(resumed / "tb", purges), _read_tb_scalars(straight / "tb")
  assert purges == [4]
  assert tb_resumed.pop("timing/step_s") == pytest.approx(
      {1: 0.2, 2: 0.2, 3: 0.2, 4: 0.3, 5: 0.3, 6: 0.3})
  tb_straight.pop("timing/step_s")
  for tb in (tb_resumed, tb_straight):
    tb.pop("timing/elapsed_s")
  assert _canon(tb_resumed) == _canon(tb_straight) and tb_straight["len"] == {s: 100.0 + s for s in range(1, 7)}
  # a fresh (non-resumed) writer keeps the old log aside instead of deleting it
  MetricsWriter(resumed, tensorboard=False).close()
  assert (resumed / "metrics.jsonl").read_text() == ""
  assert len(read_jsonl(resumed / "metrics.jsonl.prev")) == 6


def test_progress_bar_shows_key_numbers():
  out = io.StringIO()
  with ProgressBar(10, {"reward": "reward/mean", "acc": "acc", "tok/s": "tokens_per_s"},
                   file=out, mininterval=0) as bar:
    postfix = bar.update(4, {"reward": {"mean": jnp.float32(0.123456)}, "acc": 0.5},
                         timing={"tokens_per_s": 912.0})
  assert postfix == "reward=0.1235, acc=0.5, tok/s=912"
  assert "4/10" in out.getvalue() and "reward=0.1235" in out.getvalue()


def _write_run(run_dir: Path, offset: float) -> None:
  with MetricsWriter(run_dir, tensorboard=False) as writer:
    for step in range(1, 41):
      writer.write(step, {"reward/mean": offset + np.log(step) + 0.1 * np.sin(step),
                          "acc": min(1.0, 0.02 * step + offset), "len": 300 - 2 * step},
                   timing={"tokens_per_s": 900.0})


def test_plots_written_and_cli(tmp_path):
  _write_run(tmp_path / "grpo", 0.0)
  _write_run(tmp_path / "intuitor", 0.2)
  written = plot.plot_metrics(tmp_path / "grpo", tmp_path / "out")
  names = sorted(p.name for p in written)
  assert names == sorted(["curves.png", "acc.png", "len.png", "reward_mean.png",
                          "timing_tokens_per_s.png"])
  for p in written:
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5_000
  cmp_png = plot.plot_runs({"grpo": tmp_path / "grpo", "intuitor": tmp_path / "intuitor"},
                           ["reward/mean", "acc"], tmp_path / "cmp.png")
  assert cmp_png.stat().st_size > 5_000
  with pytest.raises(KeyError, match="'nope'"):
    plot.plot_metrics(tmp_path / "grpo", tmp_path / "out", keys=["nope"])
  # smoothing oracle: EMA of a constant is the constant; first value is unbiased
  np.testing.assert_allclose(plot.ema(np.full(5, 3.0), 0.9), np.full(5, 3.0))
  np.testing.assert_allclose(plot.ema(np.array([1.0, 3.0]), 0.5), [1.0, (0.5 * 0.5 * 1.0 + 0.5 * 3.0) / (0.5 * 0.5 + 0.5)])

  res = subprocess.run(
      [sys.executable, "-m", "exrl.infra.plot", str(tmp_path / "grpo"), str(tmp_path / "intuitor"),
       "--keys", "acc", "len", "--out", str(tmp_path / "cli")],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out == {"plots": [str(tmp_path / "cli" / "compare.png")]}
  assert (tmp_path / "cli" / "compare.png").stat().st_size > 5_000
