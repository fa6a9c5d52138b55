"""python -m experiments.bench_token_stats

Fused streaming token statistics (kernels.token_stats, default implementation: chunked XLA on CPU) vs the reference
that materialises the [N, V] logits. Both run jitted fwd+bwd of `sum(logp) + 0.1 * sum(entropy)` with respect to
hidden and w (fp32). Per shape: compiled temp memory (`compiled.memory_analysis().temp_size_in_bytes`) and wall time
after one warm-up each, compile excluded: repeats run in back-to-back pairs (reference, then default) and
time_ratio is the median over pairs of default/reference, so both sides of a ratio share the machine's load).
Shapes: N=4096, D=512, V=32768 and N=2048, D=512, V=151936 (Qwen's vocab; not a multiple of the block size).

Runtime on 2 CPU cores: ~8 min (7 pairs per shape). Result measured on the 2-core dev box, shared with other jobs
(load average ~5, so single timings swing 2x; the paired ratio is the stable number):
  V=32768:  temp MB reference 2048.1, default 58.1  -> mem_ratio 0.0284 (1/35);  time_ratio 0.98
  V=151936: temp MB reference 4748.0, default 30.0  -> mem_ratio 0.0063 (1/158); time_ratio 1.01
  last line: {"V32768": {"mem_ratio": 0.0284, "time_ratio": 0.976, ...}, "V151936": {"mem_ratio": 0.0063,
              "time_ratio": 1.006, ...}}  (also written to runs/bench_token_stats/result.json)
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from exrl import kernels


@dataclasses.dataclass(frozen=True)
class Config:
  repeats: int = 7  # timed (reference, default) pairs per shape
  out_dir: str = "runs/bench_token_stats"
  seed: int = 0
  shapes: tuple[tuple[int, int, int], ...] = ((4096, 512, 32768), (2048, 512, 151936))  # (N, D, V)


def _step(implementation, targets_N):
  """Jitted fwd+bwd of sum(logp) + 0.1 sum(entropy) with respect to (hidden, w)."""
  def loss(hidden_NxD, w_DxV):
    s = kernels.token_stats(hidden_NxD, w_DxV, targets_N, implementation=implementation)
    return jnp.sum(s.logp) + 0.1 * jnp.sum(s.entropy)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def bench_shape(n, d, v, repeats, seed):
  k_h, k_w, k_t = jax.random.split(jax.random.key(seed), 3)
  hidden_NxD = jax.random.normal(k_h, (n, d), jnp.float32)
  w_DxV = jax.random.normal(k_w, (d, v), jnp.float32) / np.sqrt(d)
  targets_N = jax.random.randint(k_t, (n,), 0, v)
  compiled, temp_bytes, outs = {}, {}, {}
  for name in ("reference", "auto"):
    compiled[name] = _step(name, targets_N).lower(hidden_NxD, w_DxV).compile()
    temp_bytes[name] = compiled[name].memory_analysis().temp_size_in_bytes
    outs[name] = jax.block_until_ready(compiled[name](hidden_NxD, w_DxV))  # warm-up
  # Sanity: the two must agree, or the timing compares different work.
  np.testing.assert_allclose(outs["auto"][0], outs["reference"][0], rtol=1e-4)
  np.testing.assert_allclose(outs["auto"][1][1], outs["reference"][1][1], rtol=1e-3, atol=1e-4)
  del outs
  times = {"reference": [], "auto": []}
  for _ in range(repeats):
    for name in ("reference", "auto"):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled[name](hidden_NxD, w_DxV))
      times[name].append(time.perf_counter() - t0)
  med = {k: statistics.median(x) for k, x in times.items()}
  ratio = statistics.median(a / r for a, r in zip(times["auto"], times["reference"]))
  print(f"N={n} D={d} V={v}: temp MB reference {temp_bytes['reference'] / 2**20:.1f}, "
        f"default {temp_bytes['auto'] / 2**20:.1f}; median s reference {med['reference']:.3f}, "
        f"default {med['auto']:.3f}; all s {json.dumps({k: [round(t, 3) for t in x] for k, x in times.items()})}",
        flush=True)
  return {"mem_ratio": temp_bytes["auto"] / temp_bytes["reference"], "time_ratio": ratio,
          "temp_bytes_reference": temp_bytes["reference"], "temp_bytes_default": temp_bytes["auto"],
          "time_s_reference": med["reference"], "time_s_default": med["auto"]}


def main(cfg: Config):
  print(f"backend {jax.default_backend()}, default implementation {kernels.api.default_implementation()}",
        flush=True)
  result = {f"V{v}": bench_shape(n, d, v, cfg.repeats, cfg.seed) for n, d, v in cfg.shapes}
  out_dir = Path(cfg.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "result.json").write_text(json.dumps(result, indent=2))
  print(json.dumps(result))


if __name__ == "__main__":
  main(tyro.cli(Config))
