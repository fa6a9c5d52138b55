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

Resuming (what train loops call):

  step, state, meta = ckpt.restore_latest(abstract_state, restart=False)
  # -> (newest step that restores, its state, its meta), or (0, None, None) when no step dir exists

  * Step dirs are tried newest first. A step that fails to restore (truncated / deleted array
    file, missing `state/_METADATA`, empty dir, ...) is reported in ONE line and renamed to
    `quarantine/<step>-<reason>` (never deleted); the next older step is tried.
  * A step whose only damage is a lost `_CHECKPOINT_METADATA` still restores (its items are
    intact) and is used; `latest_step()` / `all_steps()` ignore such steps, `restore_latest` does not.
  * It never silently starts from 0 when step dirs exist: if none restores, it raises
    `CheckpointError` listing every step and why, and moves nothing. With `restart=True` it
    instead moves them all to `quarantine/` and returns (0, None, None).
  * `save(step, ...)` of a step whose dir already exists on disk (e.g. left by an older run)
    moves the old dir to `quarantine/<step>-replaced` first, so nothing is overwritten in place.
  * A save that cannot be written (disk full, permission denied) raises `CheckpointWriteError`
    (an OSError carrying the errno when known) naming the directory and the last intact step.
    With async saving it surfaces at the next `save()`, `wait()` or `close()`.

`restore(step, abstract_state)` and `latest_step()` keep working for explicit use; neither
quarantines anything.

Multi-host: quarantine renames are done by process 0 only; every process must see the same
failure (a shared filesystem), which holds for the damage modes above.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import random
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.path import step as ocp_step

_STATE, _META = "state", "meta"
_TRASH = "_deleted"  # old steps are renamed here before removal
_QUARANTINE = "quarantine"  # damaged or replaced steps are renamed here, never deleted


class CheckpointError(RuntimeError):
  """Step dirs exist but none restores (and `restart=False`)."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; `.errno` is set when the OS reported one (e.g. ENOSPC)."""


def _reason(e: BaseException) -> str:
  """The innermost cause of `e` as one short line (orbax wraps tensorstore's useful message)."""
  chain = [e]
  while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
    chain.append(nxt)
  inner = chain[-1]
  line = " ".join(str(inner).split())  # tensorstore messages span lines
  if len(line) > 400:
    line = line[:397] + "..."
  return f"{type(inner).__name__}: {line}" if line else type(inner).__name__


def _errno(e: BaseException) -> int | None:
  """errno of the first OSError in `e`'s chain, or ENOSPC / EACCES read from a tensorstore message."""
  x: BaseException | None = e
  for _ in range(20):
    if x is None:
      break
    if isinstance(x, OSError) and x.errno:
      return x.errno
    msg = str(x)
    if "No space left" in msg or "RESOURCE_EXHAUSTED" in msg:
      return errno.ENOSPC
    if "File too large" in msg:
      return errno.EFBIG
    if "Permission denied" in msg or "PERMISSION_DENIED" in msg:
      return errno.EACCES
    x = x.__cause__ or x.__context__
  return None


@contextlib.contextmanager
def _quiet_orbax_coroutines():
  """Drops "Exception ignored in <coroutine>" dumps of orbax's sibling reads when one read fails."""
  prev = sys.unraisablehook

  def hook(u):
    code = getattr(u.object, "cr_code", None)
    if code is None or "orbax" not in code.co_filename:
      prev(u)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    gc.collect()  # the abandoned coroutines are collected here, while the hook is still ours
    sys.unraisablehook = prev


def _stderr_line(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


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
    log: where one-line reports (fallbacks, quarantines) go; default stderr.
  """

  def __init__(
      self,
      directory: str | Path,
      keep: int = 3,
      save_interval_steps: int = 1,
      async_save: bool = True,
      log: Callable[[str], None] = _stderr_line,
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
    self._log = log
    self._saved_here: set[int] = set()  # steps this instance saved: a repeat save is a no-op
    self._pending: tuple[int, int] | None = None  # (step, approx bytes) of the in-flight save
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

  def step_dirs(self) -> list[int]:
    """Every finalized step dir on disk, complete or damaged, ascending (candidates for resume)."""
    if not self.directory.is_dir():
      return []
    return sorted(int(p.name) for p in self.directory.iterdir()
                  if p.name.isdigit() and p.is_dir() and ocp_step.is_path_finalized(p))

  @property
  def quarantine_dir(self) -> epath.Path:
    return self.directory / _QUARANTINE

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
    if step in self._saved_here:
      return False  # this run already wrote this step: same step means same state
    self.wait()  # previous save committed (or its failure raised) and its deletions done
    self._purge_trash()
    on_disk = self.step_dirs()
    if on_disk and step < on_disk[-1]:
      # keep-last-k is by step order, so an older step would evict newer checkpoints
      raise ValueError(f"step={step} is older than the checkpoint step={on_disk[-1]} in {self.directory}; "
                       "resume with restore_latest() (it quarantines damaged newer steps) or save a newer step")
    if step in on_disk:
      if not (force or step % self.save_interval_steps == 0):
        return False
      # left by an earlier run (e.g. damaged and skipped on resume): move aside, never overwrite in place
      moved = self._quarantine(step, "replaced")
      self._log(f"[checkpoint] step {step} already on disk; moved the old copy to {moved} before saving")
      self._manager.reload()
    nbytes = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state))
    try:
      started = self._manager.save(
          step,
          args=ocp.args.Composite(
              **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
          ),
          force=force,
      )
    except Exception as e:
      if _errno(e) is None:
        raise
      raise self._write_error(step, nbytes, e) from e
    if started:
      self._saved_here.add(step)
      self._pending = (step, nbytes)
    return started

  def _write_error(self, step: int, nbytes: int, e: BaseException) -> CheckpointWriteError:
    code = _errno(e)
    steps = self.all_steps()
    intact = f"the last committed step {steps[-1]} is intact" if steps else "no earlier checkpoint exists"
    why = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file size limit",
           errno.EACCES: "permission denied", errno.EROFS: "read-only filesystem"}.get(code, "write failed")
    msg = (f"could not write checkpoint step {step} ({nbytes / 2**20:.1f} MiB of arrays) to {self.directory}: "
           f"{why} ({_reason(e)}); {intact}")
    return CheckpointWriteError(code or errno.EIO, msg)

  def restore(self, step: int | None = None, abstract_state: Any = None) -> tuple[Any, dict]:
    """Restores `(state, meta)` from `step` (default: latest committed step).

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with `.sharding`) or concrete arrays,
    e.g. `jax.eval_shape(init_fn, ...)` with shardings attached; leaves are restored with those
    shapes, dtypes and shardings, so a sharded state restores sharded. If None, arrays come back
    with the sharding recorded at save time (same topology only).
    """
    self.wait()
    if step is None:
      steps = self.all_steps()
      if not steps:
        raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
      step = steps[-1]
    elif int(step) not in (steps := self.step_dirs()):
      raise FileNotFoundError(
          f"step={step} has no checkpoint in {self.directory}; steps on disk: {steps}"
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

  def restore_latest(self, abstract_state: Any = None, *, restart: bool = False
                     ) -> tuple[int, Any, dict] | tuple[int, None, None]:
    """Newest step that restores -> `(step, state, meta)`; `(0, None, None)` when there is none.

    Damaged steps are reported in one line each and quarantined (see the module docstring). If step
    dirs exist and none restores: raises `CheckpointError` (nothing moved) unless `restart`, which
    quarantines them all and returns `(0, None, None)`.
    """
    self.wait()
    candidates = self.step_dirs()
    failures: list[tuple[int, str, str]] = []  # (step, slug, reason)
    for step in reversed(candidates):
      try:
        with _quiet_orbax_coroutines():
          state, meta = self.restore(step, abstract_state)
      except Exception as e:  # orbax / tensorstore raise many types; every one means "not this step"
        failures.append((step, self._damage_slug(self.directory / str(step)), _reason(e)))
        continue
      for bad, slug, reason in failures:
        moved = self._quarantine(bad, slug)
        self._log(f"[checkpoint] step {bad} in {self.directory} does not restore ({reason}); "
                  f"moved it to {moved}; resuming from step {step}")
      if failures:
        self._manager.reload()
      if not (self.directory / str(step) / "_CHECKPOINT_METADATA").is_file():
        self._log(f"[checkpoint] step {step} in {self.directory} lost its _CHECKPOINT_METADATA "
                  "but its state and meta restored; resuming from it")
      return step, state, meta
    if not failures:
      return 0, None, None
    listing = "; ".join(f"step {s}: {r}" for s, _, r in failures)
    if not restart:
      raise CheckpointError(
          f"no checkpoint in {self.directory} restores ({listing}). Nothing was changed. "
          f"Pass restart=True (the --rl.restart or --sft.restart flag) to move them to {self.quarantine_dir} and start from step 0")
    for bad, slug, _ in failures:
      moved = self._quarantine(bad, slug)
      self._log(f"[checkpoint] restart requested: moved unrestorable step {bad} to {moved}")
    self._manager.reload()
    return 0, None, None

  def _damage_slug(self, step_dir: epath.Path) -> str:
    """A short tag for the quarantine name saying what is missing."""
    if not step_dir.is_dir() or not any(step_dir.iterdir()):
      return "empty"
    if not (step_dir / _STATE / "_METADATA").is_file():
      return "no-state-metadata"
    if not (step_dir / _META / "metadata").is_file():
      return "no-meta"
    return "unreadable"

  def _quarantine(self, step: int, slug: str) -> epath.Path:
    """Renames step dir `step` to `quarantine/<step>-<slug>[-n]` (one atomic rename); returns the new path."""
    self.quarantine_dir.mkdir(parents=True, exist_ok=True)
    dest = self.quarantine_dir / f"{step}-{slug}"
    n = 1
    while dest.exists():
      n += 1
      dest = self.quarantine_dir / f"{step}-{slug}-{n}"
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(dest)
    return dest

  def wait(self) -> None:
    """Blocks until any in-flight async save has committed; a failed write raises `CheckpointWriteError`."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      pending, self._pending = self._pending, None
      if pending is None or _errno(e) is None:
        raise
      self._saved_here.discard(pending[0])
      raise self._write_error(*pending, e) from e
    self._pending = None

  def close(self) -> None:
    """Waits for in-flight saves and releases orbax's threads (even when the last save failed)."""
    try:
      self.wait()
    finally:
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


def export_hf(config: Any, params: Any, path: str | Path, dtype: str | None = None) -> None:
  """Writes an HF directory (config.json + safetensors) servable by vLLM / transformers; tensors in `dtype`
  (default: the config's param_dtype)."""
  from exrl.models import hf  # lazy: models layer is optional for pure checkpointing

  hf.save(config, params, path, dtype=dtype)
