"""The accelerator report's token-statistics section: materialised logits vs chunked XLA vs the Pallas kernels.

Each implementation runs jitted fwd+bwd of sum(logp) + 0.1 · sum(entropy) with respect to (hidden, w) at one shape.
Per implementation: compile seconds, temp bytes from `compiled.memory_analysis()`, median fwd+bwd seconds, and the
max abs error of logp, entropy, d hidden and d w against the materialised-logits reference.
On a GPU it then recommends the GPU default: pallas_gpu only if it is faster than chunked XLA with no more error.
"""
from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp

from experiments.accel_env import max_abs_err, time_call
from exrl.kernels import pallas_gpu, reference, xla
from exrl.kernels import pallas as pallas_tpu


def implementations(backend: str, gpu_blocks, tiny: bool) -> dict:
  """name -> token_stats function for this backend; on CPU (tiny) every path runs, the kernels interpreted."""
  impls = {"reference": reference.token_stats, "xla": xla.token_stats}
  if backend == "gpu" or tiny:
    for bn, bv, bd, warps in gpu_blocks:
      impls[f"pallas_gpu[{bn}x{bv}x{bd},w{warps}]"] = functools.partial(
          pallas_gpu.token_stats, block_n=bn, block_v=bv, block_d=bd, num_warps=warps)
  if backend == "tpu" or tiny:
    impls["pallas"] = pallas_tpu.token_stats
  return impls


def _step(fn, targets_N):
  def loss(hidden_NxD, w_DxV):
    s = fn(hidden_NxD, w_DxV, targets_N)
    return jnp.sum(s.logp) + 0.1 * jnp.sum(s.entropy), (s.logp, s.entropy)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def run(shape, dtype: str, repeats: int, gpu_blocks, tiny: bool, put, deadline: float) -> dict:
  n, d, v = shape
  k_h, k_w, k_t = jax.random.split(jax.random.key(0), 3)
  hidden_NxD = jax.random.normal(k_h, (n, d), jnp.float32).astype(dtype)
  w_DxV = (jax.random.normal(k_w, (d, v), jnp.float32) / d ** 0.5).astype(dtype)
  targets_N = jax.random.randint(k_t, (n,), 0, v)
  put("shape", {"N": n, "D": d, "V": v, "dtype": dtype, "loss": "sum(logp) + 0.1 sum(entropy)"})
  results, want = {}, None
  for name, fn in implementations(jax.default_backend(), gpu_blocks, tiny).items():
    if time.monotonic() > deadline:
      results[name] = {"skipped": "section deadline passed"}
      put("implementations", results)
      continue
    try:
      t0 = time.perf_counter()
      compiled = _step(fn, targets_N).lower(hidden_NxD, w_DxV).compile()
      memory = compiled.memory_analysis()  # None where a backend does not report it
      row = {"compile_s": time.perf_counter() - t0, "temp_bytes": getattr(memory, "temp_size_in_bytes", None)}
      (_, (logp, entropy)), (dh, dw) = jax.block_until_ready(compiled(hidden_NxD, w_DxV))
      times = time_call(compiled, hidden_NxD, w_DxV, repeats=repeats)
      row.update(fwd_bwd_s=statistics.median(times), fwd_bwd_s_all=times)
      if want is None:  # the reference runs first: it is the oracle for the rest
        want = (logp, entropy, dh, dw)
        row["max_abs"] = {k: float(jnp.max(jnp.abs(x.astype(jnp.float32))))
                          for k, x in zip(("logp", "entropy", "dhidden", "dw"), want)}
      else:
        row["max_abs_err"] = {k: max_abs_err(a, b) for k, a, b in
                              zip(("logp", "entropy", "dhidden", "dw"), (logp, entropy, dh, dw), want)}
      del compiled, logp, entropy, dh, dw
    except Exception as e:  # a kernel that fails to compile or run is a finding, not the end of the report
      row = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
    results[name] = row
    put("implementations", results)
  decision = recommend_gpu_default(results) if jax.default_backend() == "gpu" else {
      "recommendation": None, "reason": f"not a GPU (backend {jax.default_backend()}): nothing to decide"}
  put("gpu_default", decision)
  return {"implementations": results, "gpu_default": decision}


def recommend_gpu_default(results: dict) -> dict:
  """pallas_gpu (its fastest block config) if it beats chunked XLA's fwd+bwd time with a logp and dw error no
  larger than XLA's (or 1e-3); otherwise xla."""
  base = results.get("xla", {})
  if "fwd_bwd_s" not in base:
    return {"recommendation": None, "reason": "chunked XLA did not run, so there is nothing to compare against"}
  ok = {k: r for k, r in results.items() if k.startswith("pallas_gpu") and "fwd_bwd_s" in r}
  if not ok:
    return {"recommendation": "xla", "reason": "no pallas_gpu configuration compiled and ran"}
  name, best = min(ok.items(), key=lambda kv: kv[1]["fwd_bwd_s"])
  speedup = base["fwd_bwd_s"] / best["fwd_bwd_s"]
  accurate = all(best["max_abs_err"][k] <= max(base["max_abs_err"][k], 1e-3) for k in ("logp", "dw"))
  choice = "pallas_gpu" if speedup > 1 and accurate else "xla"
  return {"recommendation": choice, "best_pallas_gpu": name, "speedup_vs_xla": speedup, "accurate": accurate,
          "reason": f"{name} is {speedup:.2f}x chunked XLA's speed; errors within XLA's: {accurate}"}
