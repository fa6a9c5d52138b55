"""Run persistence: orbax checkpoints of any train-state pytree plus JSON host state.

A checkpoint step directory holds two items:
  state/  the device pytree (params, optimizer state, step, PRNG keys, ...) via `StandardSave`
  meta/   JSON host state (config dict, data / curriculum position, python RNG state,
          metrics-file offset, ...) via `JsonSave`

Crash safety (local filesystems):
  * orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` on
    commit, so a save killed at any point leaves only a tmp dir that is ignored and removed on
    the next start (`cleanup_tmp_directories=True`);
  * old steps beyond `keep` are first renamed into `_deleted/` (one atomic rename) and only then
    removed, so a kill mid-delete cannot leave a half-deleted dir that looks like a step;
  * `latest_step()` / `restore()` only consider step dirs that hold both items' metadata.

PRNG keys: typed key arrays (`jax.random.key`) and raw uint32 keys (`jax.random.PRNGKey`) both
round-trip; orbax stores typed keys as their key data plus the impl name.

Async saving (the default) copies device arrays to host before `save()` returns and writes in a
background thread, so the caller may donate / overwrite the state right after `save()`. Call
`wait()` (or `close()`) before the process exits, or the last save is lost (never corrupted).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.path import step as ocp_step

_STATE, _META = "state", "meta"
_TRASH = "_deleted"  # old steps are renamed here before removal


def _to_abstract(x: Any) -> Any:
  """Concrete or abstract array -> ShapeDtypeStruct that keeps its sharding (if any)."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, (np.ndarray, np.generic)):
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
  return x  # python scalars etc. restore as saved


class Checkpointer:
  """Keeps the last `keep` checkpoints of (state pytree, JSON meta) under `directory`.

  Args:
    directory: run checkpoint directory (created if missing).
    keep: number of most recent checkpoints kept; older ones are deleted after a save commits.
    save_interval_steps: `save(step, ...)` writes only when `step % save_interval_steps == 0`
      (or `force=True`).
    async_save: write in a background thread (default); `wait()` blocks until committed.
  """

  def __init__(
      self,
      directory: str | Path,
      keep: int = 3,
      save_interval_steps: int = 1,
      async_save: bool = True,
  ):
    if keep < 1:
      raise ValueError(f"keep={keep} must be >= 1 (number of checkpoints kept)")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps={save_interval_steps} must be >= 1")
    self.directory = epath.Path(directory)  # epath: local dirs and gs:// alike
    if not str(directory).startswith("gs://"):
      self.directory = self.directory.absolute()
    self.keep = keep
    self.save_interval_steps = save_interval_steps
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # drop dirs of saves killed before commit
        todelete_subdir=_TRASH,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(_STATE, _META)
    )
    self._purge_trash()

  # ---- queries -------------------------------------------------------------------------------

  def _is_complete(self, step_dir: epath.Path) -> bool:
    """A committed step dir: final name (or commit marker on GCS) and both items' metadata."""
    return (
        step_dir.name.isdigit()
        and ocp_step.is_path_finalized(step_dir)
        and (step_dir / "_CHECKPOINT_METADATA").is_file()
        and (step_dir / _STATE / "_METADATA").is_file()
        and (step_dir / _META / "metadata").is_file()
    )

  def all_steps(self) -> list[int]:
    """Committed, complete steps on disk, ascending (reads the directory, not a cache)."""
    if not self.directory.is_dir():
      return []
    return sorted(int(p.name) for p in self.directory.iterdir() if self._is_complete(p))

  def latest_step(self) -> int | None:
    """Most recent committed step, or None if there is no checkpoint yet."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  # ---- save / restore --------------------------------------------------------------------------

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Saves `state` (pytree of arrays) and `meta` (JSON-serialisable dict) as `step`.

    Returns True if a save was started (False when `step` is off the save interval and not
    `force`d, or already saved). With async saving the write finishes in the background.
    """
    if not isinstance(meta, dict):
      raise TypeError(f"meta must be a JSON-serialisable dict, got {type(meta).__name__}")
    try:
      json.dumps(meta)  # fail here, not later in orbax's background thread
    except (TypeError, ValueError) as e:
      raise TypeError(f"meta is not JSON-serialisable: {e}") from e
    step = int(step)
    steps = self.all_steps()
    if step in steps:
      return False  # orbax refuses to overwrite; same step means same state on resume
    if steps and step < steps[-1]:
      # keep-last-k is by step order, so an older step would evict newer checkpoints
      raise ValueError(f"step={step} is older than the latest checkpoint step={steps[-1]}")
    self._manager.wait_until_finished()  # previous save's deletions done -> trash can go
    self._purge_trash()
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
        ),
        force=force,
    )

  def restore(self, step: int | None = None, abstract_state: Any = None) -> tuple[Any, dict]:
    """Restores `(state, meta)` from `step` (default: latest committed step).

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with `.sharding`) or concrete arrays,
    e.g. `jax.eval_shape(init_fn, ...)` with shardings attached; leaves are restored with those
    shapes, dtypes and shardings, so a sharded state restores sharded. If None, arrays come back
    with the sharding recorded at save time (same topology only).
    """
    self._manager.wait_until_finished()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
      step = steps[-1]
    elif int(step) not in steps:
      raise FileNotFoundError(
          f"step={step} has no committed checkpoint in {self.directory}; valid steps: {steps}"
      )
    state_args = (
        ocp.args.StandardRestore()
        if abstract_state is None
        else ocp.args.StandardRestore(jax.tree.map(_to_abstract, abstract_state))
    )
    self._manager.reload()  # the step may have been written by another process
    out = self._manager.restore(
        int(step),
        args=ocp.args.Composite(**{_STATE: state_args, _META: ocp.args.JsonRestore()}),
    )
    return out[_STATE], dict(out[_META])

  def wait(self) -> None:
    """Blocks until any in-flight async save has committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for in-flight saves and releases orbax's threads."""
    self._manager.wait_until_finished()
    self._manager.close()
    self._purge_trash()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _purge_trash(self) -> None:
    trash = self.directory / _TRASH
    if jax.process_index() == 0 and trash.exists():
      try:
        trash.rmtree()
      except FileNotFoundError:  # a concurrent purge got there first
        pass


# ---- host RNG state <-> JSON ---------------------------------------------------------------------


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
  kind = state.get("kind")
  if isinstance(rng, random.Random) and kind == "python":
    rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))
  elif isinstance(rng, np.random.Generator) and kind == "numpy":
    rng.bit_generator.state = state["state"]
  else:
    raise TypeError(f"cannot restore RNG state of kind={kind!r} into {type(rng).__name__}")


def export_hf(config: Any, params: Any, path: str | Path) -> None:
  """Writes an HF directory (config.json + safetensors) servable by vLLM / transformers."""
  from exrl.models import hf  # lazy: models layer is optional for pure checkpointing

  hf.save(config, params, path)
