"""LoRA adapters (arXiv:2106.09685) on the decoder's projections: W x + (alpha / r) B A x, with the base frozen.

An adapter is a param tree beside the base's: for each targeted projection `w` float[L, *in, *out] it holds
`{w}_lora_a` float32[L, *in, r] and `{w}_lora_b` float32[L, r, *out] under "layers". `combine(base, adapter)`
puts them into the base's "layers" dict (B pre-scaled by alpha / r; no weight is copied) and the modules add
(x @ A) @ B to each adapted projection inside the layer scan (`modules._adapted`): nothing base-sized is
ever materialised, and the backward pass computes no base-weight gradient. `merge` folds the adapter into
dense weights, for export only.

Why not google's qwix (its LoRA / QLoRA providers, used by tunix): qwix intercepts `dot_general` / `einsum`
inside one wrapped flax model object and finds the weight by following unary ops back to a param. exrl's
functional API builds a fresh `Decoder(config)` (and, in the sampler's unrolled decode, `Block(config)`) per
call, so every call site would need the wrapped model threaded through; and the one-token decode path
concatenates wq / wk / wv (and w_gate / w_up) before one matmul (`modules.dense_fused`), which qwix cannot
trace back to a param, so the sampler would silently sample the base while the trainer trains the adapter.
qwix also creates the adapter inside the model's params, where exrl keeps it as the separate trainable tree
the optimiser sees. The adapter here is ~100 lines over the same modules.

Defaults follow "LoRA Without Regret" (Thinking Machines, 2025): every attention and MLP projection, alpha 32
with the 1/r scale, A ~ U(+-1/sqrt(fan_in)) and B = 0 (PEFT's init), so the adapted model starts as the base.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp

from exrl.models import decoder, quant
from exrl.models.config import ModelConfig

# exrl projection -> the HF module name PEFT's target_modules and key names use.
HF_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
              "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
ALL_TARGETS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank 0 trains every weight (no adapter). targets: a regex that must fully match a projection's HF name
  (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj) or its exrl name (wq ... w_down).
  base_dtype: how the frozen base is held: float32 (as loaded), bfloat16, int8 or nf4 (QLoRA)."""
  rank: int = 0
  alpha: float = 32.0
  targets: str = ALL_TARGETS
  base_dtype: str = "float32"
  base_path: str = ""  # the base model's directory, recorded in checkpoints and the PEFT export (entry points set it)

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"lora.rank={self.rank} must be >= 0 (0: full fine-tuning)")
    if self.alpha <= 0:
      raise ValueError(f"lora.alpha={self.alpha} must be > 0")
    if self.base_dtype not in quant.BASE_DTYPES:
      raise ValueError(f"lora.base_dtype={self.base_dtype!r}; valid: {quant.BASE_DTYPES}")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ValueError(f"lora.targets={self.targets!r} is not a valid regex: {e}") from e
    if self.rank and not target_names(self):
      raise ValueError(f"lora.targets={self.targets!r} matches no projection; names: "
                       f"{' '.join(h.split('.')[-1] for h in HF_MODULES.values())} (or {' '.join(HF_MODULES)})")

  @property
  def on(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def target_names(cfg: LoraConfig) -> tuple[str, ...]:
  """The exrl projection names `cfg.targets` selects, in HF_MODULES order."""
  pattern = re.compile(cfg.targets)
  return tuple(n for n, hf in HF_MODULES.items() if pattern.fullmatch(hf.split(".")[-1]) or pattern.fullmatch(n))


def adapter_shapes(config: ModelConfig, cfg: LoraConfig) -> dict:
  """{"layers": {f"{w}_lora_a": (L, *in, r), f"{w}_lora_b": (L, r, *out)}} for each target."""
  shapes = decoder.param_shapes(config)["layers"]
  out = {}
  for name in target_names(cfg):
    L, *dims = shapes[name]
    n_in = quant.N_IN.get(name, 1)
    out[f"{name}_lora_a"] = (L, *dims[:n_in], cfg.rank)
    out[f"{name}_lora_b"] = (L, cfg.rank, *dims[n_in:])
  return {"layers": out}


def tree_axes(config: ModelConfig, tree: dict) -> dict:
  """Logical axes of the decoder's params, or of an adapter tree: A keeps w's input axes, B its output axes,
  the rank axis is replicated."""
  axes = decoder.param_axes(config)
  if "embed" in tree:
    return axes
  out = {}
  for key in tree["layers"]:
    name, part = key.rsplit("_lora_", 1)
    lay, *dims = axes["layers"][name]
    n_in = quant.N_IN.get(name, 1)
    out[key] = (lay, *dims[:n_in], None) if part == "a" else (lay, None, *dims[n_in:])
  return {"layers": out}


def init_adapter(config: ModelConfig, cfg: LoraConfig, key: jax.Array) -> dict:
  """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming-uniform with a = sqrt(5)), B = 0; float32."""
  shapes = adapter_shapes(config, cfg)["layers"]
  names = sorted(shapes)
  keys = dict(zip(names, jax.random.split(key, len(names))))
  out = {}
  for name, shape in shapes.items():
    if name.endswith("_lora_b"):
      out[name] = jnp.zeros(shape, jnp.float32)
    else:
      bound = 1.0 / math.sqrt(math.prod(shape[1:-1]))
      out[name] = jax.random.uniform(keys[name], shape, jnp.float32, -bound, bound)
  return {"layers": out}


def combine(base: dict, adapter: dict, cfg: LoraConfig) -> dict:
  """The adapted model's params for any decoder function: the base's leaves plus the adapter's, B scaled by
  alpha / r (differentiable in the adapter; the base is shared, not copied)."""
  lora = {k: v * cfg.scale if k.endswith("_lora_b") else v for k, v in adapter["layers"].items()}
  return {**base, "layers": {**base["layers"], **lora}}


def delta(adapter: dict, cfg: LoraConfig, name: str) -> jax.Array:
  """(alpha / r) A @ B for projection `name` as float32[L, *in, *out]."""
  a, b = adapter["layers"][f"{name}_lora_a"], adapter["layers"][f"{name}_lora_b"]
  L, r = a.shape[0], a.shape[-1]
  ab = jnp.asarray(a, jnp.float32).reshape(L, -1, r) @ jnp.asarray(b, jnp.float32).reshape(L, r, -1)
  return (cfg.scale * ab).reshape(L, *a.shape[1:-1], *b.shape[2:])


def merge(base: dict, adapter: dict, cfg: LoraConfig) -> dict:
  """Dense params W + (alpha / r) A @ B in the base's dtype (float32 for a quantised base, dequantised here):
  the decoder's own tree, for `hf.save`. Materialises every adapted weight: for export, not training."""
  quantised = sorted(k for k in base["layers"] if k.endswith(("_int8", "_nf4")))
  if quantised:
    raise ValueError(f"merge needs a dense base, got quantised leaves {quantised}; pass quant.dequantize_base(...)")
  layers = dict(base["layers"])
  for name in target_names(cfg):
    w = layers[name]
    layers[name] = (w.astype(jnp.float32) + delta(adapter, cfg, name)).astype(w.dtype)
  return {**base, "layers": layers}


def count(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))
