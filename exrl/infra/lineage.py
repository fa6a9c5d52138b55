"""Config lineage: a resumed run continues the experiment it started, or refuses in one line.

A run's `config.json` holds its current config at the top level (as it always did) plus a `lineage` key:

  "lineage": {"model": {...ModelConfig...}, "params": "<fingerprint of the initial weights>",
              "<section>": {...} (declared by an entry point, e.g. grpo's data file hash),
              "history": [{"step": 0, "time": ..., "host": ..., "config": <the whole record>},
                          {"step": 30, ..., "changed": {"steps": [30, 60]}, "override": false, "config": ...}]}

Each history entry is the config in force from checkpoint `step` on (the updates after it). On resume the new
config is compared field by field (dotted paths such as `optim.lr`, `model.hidden_size`) with the current one:

  * observe-only fields (an allow-list per config class, `OBSERVE_ONLY`) may change: the step count, eval cadence
    and size, checkpoint cadence, metric trackers, the run dir's spelling, and how the same computation is placed
    (mesh, remat, vocab-parallel head, packing width). The change is recorded as a history entry.
  * every other field, and every field a later version adds to a config class, defines the experiment: a change
    raises `ConfigChangedError` naming each differing field with its old and new value, unless the run passes
    `allow_config_change` (then the entry is recorded with `"override": true`).

A field the recorded config lacks (a code version added it) or the new one lacks is not a refusal; it is recorded.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

CONFIG_FILE = "config.json"
_KEY = "lineage"
_CONFIG = "config"  # the trainer config's section; its paths carry no prefix (`optim.lr`, as the --rl.optim.lr flag)
_ALWAYS = ("run_dir",)  # where the run lives (its spelling may change), never what is trained
_LAUNCH = ("restart", "allow_config_change")  # how this launch starts: neither compared nor recorded as a change
# Per config class: paths (or path prefixes) that only extend or observe the run, or place the same computation.
OBSERVE_ONLY: dict[str, tuple[str, ...]] = {
    "RLConfig": ("steps", "eval_every", "eval.batch_size", "eval.samples_per_problem", "eval.greedy",
                 "checkpoint_every", "keep_checkpoints", "max_skips_in_row", "kl_monitor", "mesh", "remat",
                 "vocab_parallel", "pack_width", "trackers"),
    "SFTConfig": ("steps", "checkpoint_every", "keep_checkpoints", "mesh", "remat", "vocab_parallel", "trackers"),
}
_MAX_LISTED = 12  # fields named in the refusal line; the rest are counted


class ConfigChangedError(ValueError):
  """A resume under a config that changes the experiment (cli.run reports it in one line, exit status 2)."""


_declared: dict[str, dict[str, tuple[dict, tuple[str, ...]]]] = {}


def declare(run_dir: str | os.PathLike, name: str, values: Mapping[str, Any], observe_only: Sequence[str] = ()) -> None:
  """Adds section `name` to what defines the run in `run_dir` (e.g. an entry point's data file hash); it is
  compared and recorded with the trainer's config when the run is opened. Paths in it are `name.<field>`."""
  if name in (_CONFIG, "model", "params", "history"):
    raise ValueError(f"lineage section name {name!r} is reserved; pick another")
  _declared.setdefault(_key(run_dir), {})[name] = (_plain(values), tuple(observe_only))


def _key(run_dir) -> str:
  text = os.fspath(run_dir)
  return text.rstrip("/") if "://" in text else os.fspath(Path(text).resolve())


def _plain(x: Any) -> Any:
  return json.loads(json.dumps(x, default=str))


def file_sha256(path: str | os.PathLike) -> str:
  """sha256 of a file's bytes (a data file's identity, wherever it is moved)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def params_fingerprint(params: Any) -> str:
  """sha256 over every leaf's path, shape, dtype and first <= 64 values (a cheap id of the initial weights).

  Leaves that are not addressable from this process (multi-host global arrays) contribute shape and dtype only.
  """
  import jax  # lazy: the rest of this module is plain JSON

  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    h.update(f"{jax.tree_util.keystr(path)}|{tuple(np.shape(x))}|{np.dtype(x.dtype).name}|".encode())
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      continue
    head = x[(0,) * (x.ndim - 1)][:64] if x.ndim else x
    h.update(np.ascontiguousarray(np.asarray(head)).tobytes())
  return h.hexdigest()[:24]


def make_record(run_dir, cfg_json: Mapping, model_json: Mapping, fingerprint: str) -> dict:
  """The run-defining record: trainer config, model config, initial-weights fingerprint, declared sections."""
  rec = {_CONFIG: _plain(cfg_json), "model": _plain(model_json), "params": fingerprint}
  rec.update({name: values for name, (values, _) in _declared.get(_key(run_dir), {}).items()})
  return rec


def observe_only(run_dir, cfg_class: str) -> tuple[str, ...]:
  """Allowed-to-change paths for a trainer config of class `cfg_class` plus the run's declared sections."""
  paths = _ALWAYS + OBSERVE_ONLY.get(cfg_class, ())
  for name, (_, allowed) in _declared.get(_key(run_dir), {}).items():
    paths += tuple(f"{name}.{p}" for p in allowed)
  return paths


def flatten(rec: Mapping[str, Any]) -> dict[str, Any]:
  """Dotted paths -> leaf values; the trainer config's paths carry no section prefix."""
  out: dict[str, Any] = {}

  def walk(prefix: str, x: Any) -> None:
    if isinstance(x, Mapping) and x:
      for k, v in x.items():
        walk(f"{prefix}.{k}" if prefix else str(k), v)
    else:
      out[prefix] = x

  for section, value in rec.items():
    walk("" if section == _CONFIG else section, value)
  return out


def _allowed(path: str, observe: Sequence[str]) -> bool:
  return any(path == p or path.startswith(p + ".") for p in observe)


def compare(old: Mapping, new: Mapping, observe: Sequence[str]) -> tuple[dict, dict, dict]:
  """(defining, observing, unmatched) changes between two records, {path: [old, new]} each; `unmatched` holds
  paths present in one record only, the missing side as "<absent>"."""
  a, b = ({p: v for p, v in flatten(r).items() if p not in _LAUNCH} for r in (old, new))
  defining, observing, unmatched = {}, {}, {}
  for path in sorted(a.keys() | b.keys()):
    if path not in a or path not in b:
      unmatched[path] = [a.get(path, "<absent>"), b.get(path, "<absent>")]
    elif a[path] != b[path]:
      (observing if _allowed(path, observe) else defining)[path] = [a[path], b[path]]
  return defining, observing, unmatched


def read(run_dir) -> dict | None:
  """The recorded lineage {"record", "history"} of `run_dir`, or None when it has no config.json."""
  f = Path(run_dir) / CONFIG_FILE
  if not f.is_file():
    return None
  data = json.loads(f.read_text())
  lin = data.pop(_KEY, None)
  if lin is None:  # written before lineage: the trainer config alone, taken as the run's start
    rec = {_CONFIG: data}
    return {"record": rec, "history": [{"step": 0, "config": rec, "note": "recorded before config lineage"}]}
  history = lin.pop("history")
  return {"record": {_CONFIG: data, **lin}, "history": history}


def _fmt(v: Any) -> str:
  return json.dumps(v)


def check(run_dir, record: Mapping, observe: Sequence[str], *, resume_step: int | None, allow: bool,
          flag: str) -> dict | None:
  """Before a resume from checkpoint `resume_step` (None: no checkpoint, a fresh run): compares `record` with the
  run's recorded one. Returns the pending history entry (None when nothing to record); raises ConfigChangedError
  on a change of an experiment-defining field unless `allow`."""
  recorded = read(run_dir) if resume_step is not None else None
  if recorded is None:
    return None
  defining, observing, unmatched = compare(recorded["record"], record, observe)
  if defining and not allow:
    listed = [f"{p}: {_fmt(o)} -> {_fmt(n)}" for p, (o, n) in defining.items()]
    more = f", and {len(listed) - _MAX_LISTED} more" if len(listed) > _MAX_LISTED else ""
    raise ConfigChangedError(
        f"refusing to resume {run_dir} (checkpoint step {resume_step}) under a config that changes the experiment: "
        f"{', '.join(listed[:_MAX_LISTED])}{more}. Use a new run directory, or restore those values, or pass "
        f"{flag} to continue under the new config (the change is recorded in {Path(run_dir) / CONFIG_FILE})")
  if not (defining or observing or unmatched):
    return {"history": recorded["history"]}
  changed = {**defining, **observing, **unmatched}
  what = ", ".join(f"{p}: {_fmt(o)} -> {_fmt(n)}" for p, (o, n) in list(changed.items())[:_MAX_LISTED])
  print(f"[lineage] {'overriding' if defining else 'recording'} config change on resume of {run_dir}: {what}",
        file=sys.stderr if defining else sys.stdout, flush=True)
  return {"history": recorded["history"], "changed": changed, "override": bool(defining)}


def commit(run_dir, record: Mapping, pending: dict | None, start: int) -> None:
  """Writes config.json: `record` as the current config, the history extended when the config changed at `start`.

  A run that starts at step 0 (no checkpoint restored) starts a fresh history."""
  entry = {"step": int(start), "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": socket.gethostname(), "pid": os.getpid()}
  if pending is None or start == 0:
    note = {"note": f"resumed without a {CONFIG_FILE}; the config before this step is unknown"} if start else {}
    history = [{**entry, **note, "config": record}]
  elif "changed" in pending:
    history = pending["history"] + [{**entry, "changed": pending["changed"], "override": pending["override"],
                                     "config": record}]
  else:
    history = pending["history"]
  out = {**record[_CONFIG], _KEY: {**{k: v for k, v in record.items() if k != _CONFIG}, "history": history}}
  tmp = Path(run_dir) / (CONFIG_FILE + ".tmp")
  tmp.write_text(json.dumps(out, indent=2))
  os.replace(tmp, Path(run_dir) / CONFIG_FILE)  # a kill mid-write leaves the old file, never half of one
