"""Host RNG state <-> JSON, for checkpoint meta and every stateful source (python and numpy generators)."""
from __future__ import annotations

import random

import numpy as np


def host_rng_state(rng: random.Random | np.random.Generator) -> dict:
  """JSON-serialisable state of a python or numpy RNG, for `meta`."""
  if isinstance(rng, random.Random):
    version, internal, gauss = rng.getstate()
    return {"kind": "python", "version": version, "internal": list(internal), "gauss": gauss}
  if isinstance(rng, np.random.Generator):
    return {"kind": "numpy", "state": rng.bit_generator.state}
  raise TypeError(f"rng must be random.Random or np.random.Generator, got {type(rng).__name__}")


def set_host_rng_state(rng: random.Random | np.random.Generator, state: dict) -> None:
  """Inverse of `host_rng_state`: puts `rng` back into the saved state, in place."""
  kind = state.get("kind", "python")  # ExIt buffers saved before the kind was recorded are python RNGs
  if isinstance(rng, random.Random) and kind == "python":
    rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))
  elif isinstance(rng, np.random.Generator) and kind == "numpy":
    rng.bit_generator.state = state["state"]
  else:
    raise TypeError(f"cannot restore RNG state of kind={kind!r} into {type(rng).__name__}")
