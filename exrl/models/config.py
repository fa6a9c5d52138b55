"""ModelConfig: one frozen dataclass for the Llama / Qwen2 / Qwen3 decoder families."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters. Sizes are counts; dtypes are names from `DTYPES`."""
  vocab_size: int = 512
  hidden_size: int = 128
  intermediate_size: int = 352
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  model_type: str = "qwen2"
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  rope_type: str = "default"
  # (name, value) pairs of the rope scaling dict, kept as a tuple so the config stays hashable for jit.
  rope_scaling: tuple[tuple[str, float], ...] = ()
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  qkv_bias: bool = False  # Qwen2 (and Llama with attention_bias).
  o_bias: bool = False  # Llama with attention_bias only.
  qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before rope.
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type={self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    if self.rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(f"rope_type={self.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    for field in ("param_dtype", "compute_dtype"):
      if getattr(self, field) not in DTYPES:
        raise ValueError(f"{field}={getattr(self, field)!r}; valid: {tuple(DTYPES)}")

  @property
  def rope_scaling_dict(self) -> dict[str, float]:
    return dict(self.rope_scaling)

  @property
  def dtype(self):
    return DTYPES[self.compute_dtype]

  @property
  def pdtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)
