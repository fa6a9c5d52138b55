"""The accelerator report's model sections: HF parity, the sampler engines against HF generate and the roofline,
and the checkpoint the RL-step section also uses. Every section uses one random Qwen2-layout checkpoint built with
transformers and saved once (`Checkpoint`), so exrl and torch always hold the same weights. torch is imported lazily.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import accel_env
from exrl.models import decoder, hf
from exrl.rollout import sampler


@dataclasses.dataclass(frozen=True)
class Layout:
  """A Qwen2 decoder layout; the default is Qwen2.5-0.5B's (tied embeddings, qkv bias, rope theta 1e6)."""
  vocab_size: int = 151936
  hidden_size: int = 896
  intermediate_size: int = 4864
  num_layers: int = 24
  num_heads: int = 14
  num_kv_heads: int = 2
  max_position_embeddings: int = 32768


TINY_LAYOUT = Layout(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                     num_kv_heads=2, max_position_embeddings=2048)


def torch_device() -> str:
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def _on_device(ckpt, dtype):
  """A copy of the checkpoint's torch model on torch's device in `dtype` (the fp32 host original stays exact)."""
  return copy.deepcopy(ckpt.model).to(device=torch_device(), dtype=dtype)


def _free_torch():
  import gc
  import torch
  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


class Checkpoint:
  """A random transformers Qwen2 model of `layout`, saved once to a temp dir; the torch model stays in memory."""

  def __init__(self, layout: Layout, seed: int = 0):
    import torch
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=layout.vocab_size, hidden_size=layout.hidden_size, intermediate_size=layout.intermediate_size,
        num_hidden_layers=layout.num_layers, num_attention_heads=layout.num_heads,
        num_key_value_heads=layout.num_kv_heads, max_position_embeddings=layout.max_position_embeddings,
        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
        pad_token_id=0)
    self.model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms and biases, so the parity check sees them
      for name, p in self.model.named_parameters():
        if "norm" in name or "bias" in name:
          p.add_(0.1 * torch.randn_like(p))
    self.model.generation_config.eos_token_id = None
    self.model.generation_config.pad_token_id = 0
    self._dir = tempfile.TemporaryDirectory()
    self.path = Path(self._dir.name)
    self.model.save_pretrained(self.path)
    self._fp32 = None

  def load(self, param_dtype: str, compute_dtype: str):
    """(ModelConfig, params) from the saved checkpoint, read once in fp32; every call returns fresh buffers
    (a train step may donate them), cast on the device as `hf.load(param_dtype=...)` would."""
    if self._fp32 is None:
      self._fp32 = hf.load(self.path, param_dtype="float32", compute_dtype="float32")
    config, params = self._fp32
    dtype = jnp.dtype(param_dtype)
    return (config.replace(param_dtype=param_dtype, compute_dtype=compute_dtype),
            jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), params))


# ----------------------------------------------------------------------------- HF parity


def parity(ckpt: Checkpoint, batch: int, seq_len: int, put) -> dict:
  """exrl logits vs transformers (torch on the same GPU where present) in fp32 and bf16.

  Errors are max |Δlogit| against torch fp32; the bf16 rows put exrl bf16 beside torch bf16 (both against torch
  fp32), so the bf16 error is judged against what torch itself loses. exrl fp32 runs at the default and at
  "highest" matmul precision (the GPU default may use TF32).
  """
  import torch
  dev = torch_device()
  rng = np.random.default_rng(0)
  tokens_BxT = rng.integers(1, ckpt.model.config.vocab_size, (batch, seq_len)).astype(np.int32)
  with torch.no_grad():
    ids = torch.tensor(tokens_BxT, dtype=torch.long, device=dev)
    ref = _on_device(ckpt, torch.float32)(input_ids=ids).logits.float().cpu().numpy()
    torch_bf16 = _on_device(ckpt, torch.bfloat16)(input_ids=ids).logits.float().cpu().numpy()
  _free_torch()
  out = {"torch_device": dev, "batch": batch, "seq_len": seq_len, "max_abs_logit_torch_fp32": float(np.abs(ref).max()),
         "torch_bf16_vs_torch_fp32": accel_env.max_abs_err(torch_bf16, ref)}
  put("result", out)
  for name, (pdt, cdt, precision) in {"exrl_fp32_default_precision": ("float32", "float32", "default"),
                                      "exrl_fp32_highest_precision": ("float32", "float32", "highest"),
                                      "exrl_bf16": ("bfloat16", "bfloat16", "default")}.items():
    config, params = ckpt.load(pdt, cdt)
    with jax.default_matmul_precision(precision):
      logits = jax.jit(functools.partial(decoder.logits, config))(params, jnp.asarray(tokens_BxT))
      logits = np.asarray(jax.block_until_ready(logits))
    out[f"{name}_vs_torch_fp32"] = accel_env.max_abs_err(logits, ref)
    out[f"{name}_argmax_agree"] = float(np.mean(logits.argmax(-1) == ref.argmax(-1)))
    put("result", out)
    del params
  return out


# ----------------------------------------------------------------------------- sampler


def static_engine(config, params, prompts_BxP, new_tokens: int, key) -> dict:
  """exrl's static-batch KV-cache sampler (`sampler.generate`): compile, then one timed run."""
  sampling = sampler.SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)
  valid_BxP = jnp.ones(prompts_BxP.shape, bool)
  fn = jax.jit(functools.partial(sampler.generate, config, sampling))
  t0 = time.perf_counter()
  compiled = fn.lower(params, prompts_BxP, valid_BxP, key).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = jax.block_until_ready(compiled(params, prompts_BxP, valid_BxP, key))
  run_s = time.perf_counter() - t0
  if int(out.lengths_B.min()) != new_tokens:
    raise RuntimeError(f"static engine stopped early: min length {int(out.lengths_B.min())} < {new_tokens}")
  return {"compile_s": compile_s, "run_s": run_s, "tokens_per_s": prompts_BxP.shape[0] * new_tokens / run_s}


# name -> engine(config, params, prompts_BxP, new_tokens, key) -> {"run_s", "tokens_per_s", ...}. The continuous
# engine joins here once exrl/rollout provides one; until then the report lists it as not built.
ENGINES = {"static": static_engine}
PLANNED_ENGINES = ("continuous",)


def hf_generate(model, prompts_BxP: np.ndarray, new_tokens: int) -> dict:
  """transformers `generate` (sampling at T=1, no top-k/top-p, no eos) on torch's device, after a short warm-up."""
  import torch
  dev = torch_device()
  ids = torch.tensor(prompts_BxP, dtype=torch.long, device=dev)
  kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
            top_p=1.0, eos_token_id=None, pad_token_id=0)
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  with torch.no_grad():
    model.generate(**kw, max_new_tokens=4)
    sync()
    t0 = time.perf_counter()
    seq = model.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    sync()
  run_s = time.perf_counter() - t0
  assert seq.shape[1] == prompts_BxP.shape[1] + new_tokens, seq.shape
  return {"device": dev, "run_s": run_s, "tokens_per_s": prompts_BxP.shape[0] * new_tokens / run_s}


def sampler_section(ckpt: Checkpoint, batches, prompt_len: int, new_tokens: int, bandwidth: float | None, put,
                    deadline: float) -> dict:
  """Per batch: each engine's tokens/s, HF generate's, and the bandwidth roofline (bf16 weights and KV cache)."""
  import torch
  config, params = ckpt.load("bfloat16", "bfloat16")
  hf_model = _on_device(ckpt, torch.bfloat16)
  out = {"prompt_len": prompt_len, "new_tokens": new_tokens, "dtype": "bfloat16",
         "engines_not_built": list(PLANNED_ENGINES), "batches": {}}
  try:
    for batch in batches:
      row = out["batches"][str(batch)] = {}
      if bandwidth:
        row["roofline_tokens_per_s"] = accel_env.roofline_tokens_per_s(config, batch, prompt_len, new_tokens,
                                                                       bandwidth)
      prompts = np.random.default_rng(batch).integers(1, config.vocab_size, (batch, prompt_len)).astype(np.int32)
      for name, engine in list(ENGINES.items()) + [("hf_generate", None)]:
        if time.monotonic() > deadline:
          row[name] = {"skipped": "section deadline passed"}
          continue
        try:
          if engine is None:
            row[name] = hf_generate(hf_model, prompts, new_tokens)
          else:
            row[name] = engine(config, params, jnp.asarray(prompts), new_tokens, jax.random.key(batch))
        except Exception as e:
          row[name] = {"error": f"{type(e).__name__}: {str(e)[:1000]}"}
        if "tokens_per_s" in row[name] and bandwidth:
          row[name]["fraction_of_roofline"] = row[name]["tokens_per_s"] / row["roofline_tokens_per_s"]
        put("result", out)
      for name in ENGINES:  # HF ran last, so the ratios are filled in now
        if "tokens_per_s" in row.get(name, {}) and "tokens_per_s" in row.get("hf_generate", {}):
          row[name]["ratio_vs_hf"] = row[name]["tokens_per_s"] / row["hf_generate"]["tokens_per_s"]
      put("result", out)
  finally:
    del hf_model
    _free_torch()
  return out
