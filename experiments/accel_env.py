"""The accelerator report's environment probe and arithmetic: versions, peak tables, a timed matmul and copy,
model FLOPs, MFU and the decode memory-bandwidth roofline. Imports jax and numpy only (torch lazily).

Conventions, as MaxText and tunix report their own performance: peak = the vendor's dense (no sparsity) bf16
tensor rate per chip; MFU = model FLOPs / step time / peak, where model FLOPs = 6 · (matmul params) · tokens plus
causal attention 6 · 2 · layers · heads · head_dim · T² / 2 per sequence (forward 2×, backward 4×).
"""
from __future__ import annotations

import importlib.metadata
import statistics
import time

import jax
import jax.numpy as jnp
from jax.extend import backend as jax_backend

# Dense bf16 FLOP/s and HBM bytes/s per chip from vendor datasheets, matched by substring of
# jax.devices()[0].device_kind, first match wins (so "H100 PCIe" precedes "H100").
PEAKS = (
    ("GH200", 989e12, 4.0e12), ("H200 NVL", 835e12, 4.8e12), ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12), ("H100 NVL", 835e12, 3.9e12), ("H100", 989e12, 3.35e12),
    ("B200", 2250e12, 8.0e12), ("A100", 312e12, 2.0e12), ("L40S", 362e12, 0.864e12), ("L4", 121e12, 0.3e12),
    ("A10G", 70e12, 0.6e12), ("TPU v6 lite", 918e12, 1.64e12), ("TPU v5 lite", 197e12, 0.819e12),
    ("TPU v5p", 459e12, 2.765e12), ("TPU v5", 459e12, 2.765e12), ("TPU v4", 275e12, 1.2e12),
)


def peak_for(device_kind: str) -> dict:
  """{"peak_bf16_flops", "spec_hbm_bytes_per_s", "matched"} from PEAKS; None values for an unknown kind."""
  for key, flops, bandwidth in PEAKS:
    if key.lower() in device_kind.lower():
      return {"peak_bf16_flops": flops, "spec_hbm_bytes_per_s": bandwidth, "matched": key}
  return {"peak_bf16_flops": None, "spec_hbm_bytes_per_s": None, "matched": None}


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def versions() -> dict:
  """jax, jaxlib, flax, the device plugins and CUDA as the backend reports it; torch's CUDA when present."""
  out = {d: _version(d) for d in ("jax", "jaxlib", "flax", "optax", "transformers", "torch", "libtpu",
                                   "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt")}
  out = {k: v for k, v in out.items() if v is not None}
  backend = jax_backend.get_backend()
  out["platform_version"] = getattr(backend, "platform_version", None)  # e.g. "cuda 12080" or the libtpu build
  try:
    import torch  # lazily: the environment section must work without torch
    out["torch_cuda"] = torch.version.cuda
  except ImportError:
    pass
  return out


def device_info() -> dict:
  devices = jax.devices()
  kind = devices[0].device_kind
  info = {"backend": jax.default_backend(), "device_kind": kind, "device_count": len(devices),
          "process_count": jax.process_count(), **peak_for(kind)}
  stats = getattr(devices[0], "memory_stats", lambda: None)()
  if stats and "bytes_limit" in stats:
    info["device_memory_bytes"] = stats["bytes_limit"]
  return info


def time_call(fn, *args, repeats: int = 5) -> list[float]:
  """Wall seconds of `repeats` blocking calls of an already-compiled fn (one untimed warm-up first)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return times


def timed_matmul(n: int, repeats: int = 5, dtype=jnp.bfloat16) -> dict:
  """Best FLOP/s of an [n, n] @ [n, n] product (fp32 accumulation) at `dtype`."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(dtype))
  times = time_call(f, a, b, repeats=repeats)
  return {"n": n, "dtype": jnp.dtype(dtype).name, "best_s": min(times), "median_s": statistics.median(times),
          "flops_per_s": 2 * n ** 3 / min(times)}


def timed_copy(n_bytes: int, repeats: int = 5) -> dict:
  """Best HBM bandwidth of y = 2 x over an fp32 buffer of n_bytes: it reads and writes n_bytes each."""
  x = jnp.ones((n_bytes // 4,), jnp.float32)
  f = jax.jit(lambda x: x * 2.0)
  times = time_call(f, x, repeats=repeats)
  return {"bytes": n_bytes, "best_s": min(times), "bytes_per_s": 2 * n_bytes / min(times)}


# ----------------------------------------------------------------------------- arithmetic


def param_count(config) -> int:
  """Parameters of the decoder (embedding once; a separate LM head when untied)."""
  d, hd = config.hidden_size, config.head_dim
  attn = d * hd * (2 * config.num_heads + 2 * config.num_kv_heads)
  if config.qkv_bias:
    attn += hd * (config.num_heads + 2 * config.num_kv_heads)
  norms = 2 * d + (2 * hd if config.qk_norm else 0)
  per_layer = attn + 3 * d * config.intermediate_size + norms
  head = 0 if config.tie_word_embeddings else config.vocab_size * d
  return config.num_layers * per_layer + config.vocab_size * d + head + d


def matmul_params(config) -> int:
  """Parameters that take part in a matmul per token: all but the embedding lookup (the tied head counts once)."""
  lookup = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
  return param_count(config) - lookup


def train_flops(config, batch: int, seq_len: int) -> float:
  """Model FLOPs of one forward + backward over batch × seq_len tokens: 6 N T plus causal attention."""
  dense = 6 * matmul_params(config) * batch * seq_len
  attention = 6 * 2 * config.num_layers * config.num_heads * config.head_dim * seq_len ** 2 / 2 * batch
  return float(dense + attention)


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
  return flops / seconds / peak_flops


def decode_step_bytes(config, batch: int, context: float, bytes_per_param: int = 2, kv_bytes: int = 2) -> float:
  """Bytes one decode step must read: every weight once (the embedding as the LM head) plus K and V of
  `context` cached positions in every layer for every row."""
  weights = param_count(config) * bytes_per_param
  kv = 2 * config.num_layers * batch * config.num_kv_heads * config.head_dim * context * kv_bytes
  return float(weights + kv)


def roofline_tokens_per_s(config, batch: int, prompt_len: int, new_tokens: int, bandwidth: float,
                          bytes_per_param: int = 2, kv_bytes: int = 2) -> float:
  """Upper bound on decode tokens/s from memory bandwidth: batch tokens per step, each step reading
  decode_step_bytes at the mean context prompt_len + (new_tokens + 1) / 2 over the generation."""
  context = prompt_len + (new_tokens + 1) / 2
  return batch * bandwidth / decode_step_bytes(config, batch, context, bytes_per_param, kv_bytes)


def max_abs_err(a, b) -> float:
  """max |a - b| in float32, on the device (no host copy of large gradients)."""
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))
