"""Hugging Face checkpoint interop: `load(path) -> (ModelConfig, params)` and `save(config, params, path)`.

A checkpoint is a local directory with `config.json` and `*.safetensors` (one file, or shards with
`model.safetensors.index.json`). What `save` writes loads in `transformers.AutoModelForCausalLM`. The params
are the Flax `Decoder`'s own tree (`decoder.param_shapes`), so `load` feeds `Decoder(config).apply` directly.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from exrl.models.config import DTYPES, SUPPORTED_MODEL_TYPES, ModelConfig
from exrl.models.decoder import param_shapes

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be loaded, with the reason."""


# ----------------------------------------------------------------------------- config


_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
_REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def read_config_json(file: Path) -> dict:
  """config.json as a dict; unreadable, non-JSON or non-object content is a one-line CheckpointError naming the file."""
  try:
    hf = json.loads(file.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{file} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{file} is not UTF-8 text: byte {e.start} cannot be decoded") from None
  if not isinstance(hf, dict):
    raise CheckpointError(f"{file} holds a JSON {type(hf).__name__}; expected an object of HF config fields")
  return hf


def _check_fields(hf: dict, source) -> None:
  """Required sizes present as positive integers; optional size fields, when set, positive integers too."""
  for key in _REQUIRED_INTS:
    if key not in hf:
      raise CheckpointError(f"{source} lacks the field {key!r}; an HF {hf.get('model_type')} config needs "
                            f"{', '.join(_REQUIRED_INTS)}")
  for key in (*_REQUIRED_INTS, "num_key_value_heads", "head_dim", "max_position_embeddings"):
    v = hf.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
      raise CheckpointError(f"{source}: field {key!r} is {v!r}; expected a positive integer")


def config_from_hf(hf: dict, *, param_dtype: str = "float32", compute_dtype: str = "float32",
                   source: str | os.PathLike = "config.json") -> ModelConfig:
  """Map an HF config.json dict to ModelConfig (transformers 4.x and 5.x rope layouts).

  `source` names the file in errors: a missing or non-integer size field is a CheckpointError naming it.
  """
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(f"{source}: model_type={model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
  if hf.get("use_sliding_window"):
    raise CheckpointError(f"{source}: use_sliding_window=True is not supported (full attention only)")
  if hf.get("mlp_bias"):
    raise CheckpointError(f"{source}: mlp_bias=True is not supported")
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported; supported: ('silu',)")
  _check_fields(hf, source)
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = rope.pop("rope_type", rope.pop("type", "default"))
  rope_scaling = tuple(sorted((k, float(v)) for k, v in rope.items() if isinstance(v, (int, float))))
  missing = [k for k in _ROPE_KEYS.get(rope_type, ()) if k not in dict(rope_scaling)]
  if missing:
    raise CheckpointError(f"{source}: rope_type={rope_type!r} needs rope scaling fields {list(_ROPE_KEYS[rope_type])}; "
                          f"missing {missing}")
  heads = hf["num_attention_heads"]
  eos = hf.get("eos_token_id")
  eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
  attention_bias = bool(hf.get("attention_bias", False))
  try:
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, model_type=model_type,
        max_position_embeddings=hf.get("max_position_embeddings") or 2048, rope_theta=float(rope_theta),
        rope_type=rope_type, rope_scaling=rope_scaling, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias, o_bias=model_type == "llama" and attention_bias,
        qk_norm=model_type == "qwen3", param_dtype=param_dtype, compute_dtype=compute_dtype,
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids, pad_token_id=hf.get("pad_token_id"))
  except (ValueError, TypeError) as e:  # ModelConfig's own checks (rope_type, head counts), with the file named
    raise CheckpointError(f"{source}: {e}") from None


def saved_dtype(hf: dict, default: str = "float32") -> str:
  """The dtype a checkpoint's tensors were saved in, from its config.json ("dtype", or the older
  "torch_dtype"), as a `DTYPES` name; `default` when it names none we know."""
  name = str(hf.get("dtype") or hf.get("torch_dtype") or "").removeprefix("torch.")
  return name if name in DTYPES else default


def config_to_hf(config: ModelConfig, dtype: str | None = None) -> dict:
  """HF config.json fields; `dtype` is the dtype the tensors are written in (default: config.param_dtype)."""
  c = config
  dtype = dtype or c.param_dtype
  hf = {
      "architectures": [_ARCHITECTURES[c.model_type]], "model_type": c.model_type,
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
      "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
      "tie_word_embeddings": c.tie_word_embeddings, "rope_theta": c.rope_theta,
      "rope_parameters": {"rope_type": c.rope_type, "rope_theta": c.rope_theta, **c.rope_scaling_dict},
      "bos_token_id": c.bos_token_id, "pad_token_id": c.pad_token_id,
      "eos_token_id": list(c.eos_token_ids) if len(c.eos_token_ids) != 1 else c.eos_token_ids[0],
      "torch_dtype": dtype, "dtype": dtype, "use_cache": True,
  }
  if c.rope_type != "default":
    hf["rope_scaling"] = {"rope_type": c.rope_type, **c.rope_scaling_dict}
  if c.model_type == "llama":
    hf["attention_bias"] = c.qkv_bias
  return hf


# ----------------------------------------------------------------------------- names


def _hf_names(config: ModelConfig) -> dict[str, tuple[str, str | None]]:
  """Per-layer exrl leaf -> (HF name template, kind). kind says how to reshape HF's [out, in]."""
  names = {
      "attn_norm": ("input_layernorm.weight", None), "mlp_norm": ("post_attention_layernorm.weight", None),
      "wq": ("self_attn.q_proj.weight", "in_heads"), "wk": ("self_attn.k_proj.weight", "in_heads"),
      "wv": ("self_attn.v_proj.weight", "in_heads"), "wo": ("self_attn.o_proj.weight", "heads_out"),
      "bq": ("self_attn.q_proj.bias", "heads"), "bk": ("self_attn.k_proj.bias", "heads"),
      "bv": ("self_attn.v_proj.bias", "heads"), "bo": ("self_attn.o_proj.bias", None),
      "q_norm": ("self_attn.q_norm.weight", None), "k_norm": ("self_attn.k_norm.weight", None),
      "w_gate": ("mlp.gate_proj.weight", "T"), "w_up": ("mlp.up_proj.weight", "T"),
      "w_down": ("mlp.down_proj.weight", "T"),
  }
  return {k: names[k] for k in param_shapes(config)["layers"]}


def _to_exrl(x: np.ndarray, kind: str | None, shape: tuple[int, ...]) -> np.ndarray:
  if kind in ("T", "in_heads", "heads_out"):  # HF stores [out, in]
    return x.T.reshape(shape)
  return x.reshape(shape)


def _to_hf(x: np.ndarray, kind: str | None) -> np.ndarray:
  if kind == "in_heads":  # [D, N, E] -> [N*E, D]
    return x.reshape(x.shape[0], -1).T
  if kind == "heads_out":  # [N, E, D] -> [D, N*E]
    return x.reshape(-1, x.shape[-1]).T
  if kind == "T":
    return x.T
  if kind == "heads":
    return x.reshape(-1)
  return x


# ----------------------------------------------------------------------------- load


def _weight_files(path: Path) -> dict[str, Path]:
  """Map every tensor name to the safetensors file holding it."""
  index = path / _INDEX
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
    if missing:
      raise CheckpointError(f"{index} names shard files that are missing: {missing}")
    return {name: path / f for name, f in weight_map.items()}
  files = sorted(path.glob("*.safetensors"))
  if not files:
    found = sorted(p.name for p in path.iterdir())
    raise CheckpointError(f"no *.safetensors weights in {path} (found: {found}); exrl reads safetensors only")
  out = {}
  for f in files:
    with _open(f) as st:
      out.update({name: f for name in st.keys()})
  return out


def _open(file: Path):
  try:
    return safe_open(str(file), framework="np")
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {file}: {e} (truncated or corrupt safetensors file?)") from e


class Reader:
  """One tensor at a time from a checkpoint directory, in exrl's layout and `param_dtype` (numpy, on the host):
  `top("embed" | "final_norm" | "lm_head")` and `layer(leaf, i)`. The files stay mapped until `close()`, and
  every page read counts in this process's RSS until then."""

  def __init__(self, path: str | os.PathLike, config: ModelConfig, param_dtype: str | None = None):
    self.path, self.config = Path(path), config
    self.dtype = DTYPES[param_dtype or config.param_dtype]
    self.files = _weight_files(self.path)
    self.handles: dict[Path, object] = {}
    self.shapes = param_shapes(config)
    self.names = _hf_names(config)

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor `name`, checked to be `shape`, as stored."""
    if name not in self.files:
      raise CheckpointError(f"tensor {name!r} is missing from {self.path}")
    f = self.files[name]
    if f not in self.handles:
      self.handles[f] = _open(f).__enter__()
    try:
      x = self.handles[f].get_tensor(name)
    except Exception as e:  # a truncated data section fails here, not at open
      raise CheckpointError(f"cannot read tensor {name!r} from {f}: {e}") from e
    if tuple(x.shape) != tuple(shape):
      raise CheckpointError(f"tensor {name!r} in {f.name} has shape {list(x.shape)}, expected {list(shape)}")
    return x

  def _cast(self, x) -> np.ndarray:  # on the host, tensor by tensor: never an fp32 copy of a bf16 checkpoint
    return np.asarray(x).astype(self.dtype, copy=False)

  def top(self, name: str) -> np.ndarray:
    hf_name = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
    if name == "lm_head":
      return self._cast(self.get(hf_name[name], self.shapes["lm_head"][::-1]).T)
    return self._cast(self.get(hf_name[name], self.shapes[name]))

  def layer(self, leaf: str, i: int) -> np.ndarray:
    template, kind = self.names[leaf]
    per_layer = self.shapes["layers"][leaf][1:]
    return self._cast(_to_exrl(self.get(f"model.layers.{i}.{template}", _hf_shape(per_layer, kind)), kind, per_layer))

  def close(self) -> None:  # unmaps the files: the pages read so far would otherwise count in this process's RSS
    for h in self.handles.values():
      h.__exit__(None, None, None)
    self.handles.clear()


def load(path: str | os.PathLike, *, param_dtype: str = "float32", compute_dtype: str = "float32"
         ) -> tuple[ModelConfig, dict]:
  """Load a local HF checkpoint directory into (ModelConfig, params) with params in `param_dtype`."""
  path = Path(path)
  if not path.is_dir():
    raise CheckpointError(f"{path} is not a directory; expected a local HF checkpoint directory")
  if not (path / "config.json").exists():
    raise CheckpointError(f"{path} has no config.json")
  config = config_from_hf(read_config_json(path / "config.json"), param_dtype=param_dtype,
                          compute_dtype=compute_dtype, source=path / "config.json")
  reader = Reader(path, config)
  params = {"embed": jnp.asarray(reader.top("embed")), "final_norm": jnp.asarray(reader.top("final_norm"))}
  if not config.tie_word_embeddings:
    params["lm_head"] = jnp.asarray(reader.top("lm_head"))
  reader.close()
  layers = {}
  for leaf, shape in reader.shapes["layers"].items():
    stacked = None  # filled layer by layer: one host copy of the stack, not a list of layers plus their stack
    for i in range(config.num_layers):
      x = reader.layer(leaf, i)
      stacked = np.empty(shape, x.dtype) if stacked is None else stacked
      stacked[i] = x
    layers[leaf] = jnp.asarray(stacked)
    del stacked
    reader.close()
  params["layers"] = layers
  return config, params


def _hf_shape(shape: tuple[int, ...], kind: str | None) -> tuple[int, ...]:
  """The [out, in] shape HF stores for an exrl per-layer leaf of `shape`."""
  if kind == "in_heads":  # [D, N, E]
    return (shape[1] * shape[2], shape[0])
  if kind == "heads_out":  # [H, E, D]
    return (shape[2], shape[0] * shape[1])
  if kind == "T":
    return shape[::-1]
  if kind == "heads":
    return (int(np.prod(shape)),)
  return shape


# ----------------------------------------------------------------------------- save


def save(config: ModelConfig, params: dict, path: str | os.PathLike, *,
         max_shard_bytes: int = 4 << 30, dtype: str | None = None) -> Path:
  """Write config.json and safetensors (sharded with an index past `max_shard_bytes`).

  dtype: the tensors' dtype on disk, a `DTYPES` name (default: config.param_dtype). Training in fp32 from a
  bf16 checkpoint and exporting with dtype="bfloat16" gives a checkpoint the size of the input.
  """
  layers = params["layers"]
  return save_streamed(config, lambda name: params[name], lambda leaf, i: layers[leaf][i], path,
                       max_shard_bytes=max_shard_bytes, dtype=dtype)


def save_streamed(config: ModelConfig, top: Callable[[str], object], layer: Callable[[str, int], object],
                  path: str | os.PathLike, *, max_shard_bytes: int = 4 << 30, dtype: str | None = None) -> Path:
  """`save` from callbacks, one tensor at a time: `top(name)` for "embed", "final_norm" and (untied) "lm_head",
  `layer(leaf, i)` for layer i of a stacked leaf, each array-like in exrl's layout. Every shard's safetensors
  header is written first (from the shapes) and then each tensor as it is made, so the host holds one tensor at
  a time (the embedding the largest), never the model. Shards hold whole tensors in HF order (embedding, layer
  by layer, norm, head); within a file the layout is `safetensors.save_file`'s, byte for byte.
  """
  dtype = dtype or config.param_dtype
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
  np_dtype = np.dtype(_np_dtype(dtype))
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  shapes, names = param_shapes(config), _hf_names(config)

  def host(x) -> np.ndarray:  # one tensor in the file's dtype (through fp32 when it differs, as ml_dtypes casts)
    x = np.asarray(x)
    return x if x.dtype == np_dtype else np.asarray(x, np.float32).astype(np_dtype)

  # HF name -> (its shape, a thunk that makes it), in HF order
  plan = {"model.embed_tokens.weight": (shapes["embed"], lambda: host(top("embed")))}
  for i in range(config.num_layers):
    for leaf, (template, kind) in names.items():
      hf_shape = _hf_shape(shapes["layers"][leaf][1:], kind)
      make = lambda leaf=leaf, i=i, kind=kind: _to_hf(host(layer(leaf, i)), kind)
      plan[f"model.layers.{i}.{template}"] = (hf_shape, make)
  plan["model.norm.weight"] = (shapes["final_norm"], lambda: host(top("final_norm")))
  if not config.tie_word_embeddings:
    plan["lm_head.weight"] = (shapes["lm_head"][::-1], lambda: host(top("lm_head")).T)
  nbytes = {name: math.prod(shape) * np_dtype.itemsize for name, (shape, _) in plan.items()}
  shards, current, size = [], [], 0
  for name in plan:
    if current and size + nbytes[name] > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(name)
    size += nbytes[name]
  shards.append(current)
  files = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  for fname, shard in zip(files, shards):
    _write_safetensors(path / fname, {name: plan[name] for name in shard}, np_dtype)
  if len(shards) > 1:
    weight_map = {name: fname for fname, shard in zip(files, shards) for name in shard}
    (path / _INDEX).write_text(json.dumps({"metadata": {"total_size": sum(nbytes.values())},
                                           "weight_map": weight_map}, indent=2))
  (path / "config.json").write_text(json.dumps(config_to_hf(config, dtype), indent=2))
  return path


_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _write_safetensors(file: Path, tensors: dict, np_dtype: np.dtype) -> None:
  """tensors: name -> (shape, thunk). The layout `safetensors.save_file` writes: an 8-byte little-endian header
  length, the JSON header (`__metadata__` first, tensors by name, space-padded to 8 bytes), then the data in
  header order. Each thunk is called once, in that order, and its array written and dropped."""
  order = sorted(tensors)
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name in order:
    shape = tensors[name][0]
    n = math.prod(shape) * np_dtype.itemsize
    header[name] = {"dtype": _ST_DTYPES[np_dtype.name], "shape": list(shape), "data_offsets": [offset, offset + n]}
    offset += n
  head = json.dumps(header, separators=(",", ":")).encode()
  head += b" " * (-len(head) % 8)
  with open(file, "wb") as f:
    f.write(len(head).to_bytes(8, "little") + head)
    for name in order:
      shape = tensors[name][0]
      x = np.ascontiguousarray(tensors[name][1]())
      if x.shape != tuple(shape) or x.dtype != np_dtype:
        raise ValueError(f"tensor {name!r} was made as {x.dtype}{list(x.shape)}; its header says "
                         f"{np_dtype}{list(shape)}")
      f.write(x.reshape(-1).view(np.uint8).data)
      del x


def _np_dtype(name: str):
  if name == "bfloat16":
    import ml_dtypes
    return ml_dtypes.bfloat16
  return np.dtype(name)
