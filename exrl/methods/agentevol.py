"""AgentEvol (AgentGym, arXiv 2406.04151): behaviour cloning, then M rounds of explore -> filter -> learn.

  BC on expert trajectories D_s (loss on agent tokens only)
  for m in 1..M:
    explore: K ReAct rollouts per instruction at `explore_temperature`
    keep those with reward > `reward_threshold`, deduplicated per instruction; merge with the earlier data
    learn: SFT on D_s ∪ D_kept, from the base model (`retrain="base"`, as the paper) or the current one

Evaluation is the greedy success rate per env on held-out instances (indices from `EVAL_OFFSET`), with
95% Wilson intervals. `multiturn_grpo` is the RL alternative on the same envs (exrl's RL loop with the
multi-turn collector), for comparison.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import jax

from exrl.curriculum.source import DatasetSource
from exrl.envs import ENVS, make_env
from exrl.envs.experts import run_expert
from exrl.models.config import ModelConfig
from exrl.rollout.multiturn import (SUCCESS_THRESHOLD, MultiTurnConfig, Trajectory, agent_text, rollout,
                                   trajectory_ids)
from exrl.train.collect.multiturn import EnvProblem, MultiTurnCollector
from exrl.train.evaluate import wilson_interval
from exrl.train.rl_loop import train_rl
from exrl.train.sft import SFTConfig, train_sft

EVAL_OFFSET = 1_000_000  # held-out instance indices start here; training uses [0, explore_per_env)
RETRAIN = ("base", "continue")


@dataclasses.dataclass(frozen=True)
class AgentEvolConfig:
  run_dir: str = "runs/agentevol"
  envs: tuple[str, ...] = ("maze", "wordle", "textcraft")
  env_seed: int = 0
  expert_per_env: int = 64  # D_s: the expert on instances [0, expert_per_env)
  # per-env overrides of expert_per_env, "env=N" (e.g. "textcraft=400": an env that is learned later gets more)
  expert_counts: tuple[str, ...] = ()
  explore_per_env: int = 192  # exploration instructions: instances [0, explore_per_env)
  eval_per_env: int = 100
  iterations: int = 4  # M
  samples_per_instruction: int = 1  # K
  explore_temperature: float = 1.2
  reward_threshold: float = SUCCESS_THRESHOLD
  retrain: str = "base"  # base: every iteration restarts from the base model (paper); continue: from the last
  sft_epochs: float = 4.0  # SFT steps = ceil(epochs * examples / batch_size)
  iteration_sft_epochs: float = 0.0  # epochs of each iteration's SFT; 0: sft_epochs (as BC)
  # peak lr of each iteration's SFT; 0: sft.optim.lr. With retrain="continue", restarting at BC's peak lr
  # undoes part of what BC learned, so a continued iteration should start near where BC's schedule ended
  iteration_lr: float = 0.0
  sft: SFTConfig = SFTConfig(batch_size=32, max_len=512)
  rollout: MultiTurnConfig = MultiTurnConfig(max_new_tokens=24, max_len=512)
  rollout_batch: int = 64  # envs per batched rollout
  seed: int = 0
  # instance difficulty, one "env:key=value" per kwarg of that env's constructor (e.g. "maze:size=4");
  # expert data, exploration and evaluation all build their envs through `build_env(cfg, name)`
  env_kwargs: tuple[str, ...] = ()

  def __post_init__(self):
    for name in ENVS:
      build_env(self, name)  # a bad spec fails here, naming itself, not mid-run
    if self.retrain not in RETRAIN:
      raise ValueError(f"AgentEvolConfig.retrain={self.retrain!r}; valid: {RETRAIN}")
    for name in ENVS:
      expert_count(self, name)  # a bad "env=N" fails here too
    if self.iteration_lr < 0:
      raise ValueError(f"AgentEvolConfig.iteration_lr={self.iteration_lr} must be >= 0 (0: sft.optim.lr)")
    if self.iterations < 0 or self.samples_per_instruction < 1:
      raise ValueError(f"iterations={self.iterations} must be >= 0 and samples_per_instruction="
                       f"{self.samples_per_instruction} >= 1")


def env_kwargs(cfg: AgentEvolConfig, name: str) -> dict:
  """The constructor kwargs `cfg.env_kwargs` gives env `name` (values parsed as Python literals)."""
  out = {}
  for spec in cfg.env_kwargs:
    env, sep, rest = spec.partition(":")
    key, eq, value = rest.partition("=")
    if not sep or not eq or env not in ENVS or not key.strip():
      raise ValueError(f"AgentEvolConfig.env_kwargs entry {spec!r}; want 'env:key=value' with env in {sorted(ENVS)}")
    if env == name:
      try:
        out[key.strip()] = ast.literal_eval(value.strip())
      except (ValueError, SyntaxError):
        raise ValueError(f"AgentEvolConfig.env_kwargs entry {spec!r}: value {value!r} is not a literal") from None
  return out


def expert_count(cfg: AgentEvolConfig, name: str) -> int:
  """How many expert trajectories env `name` contributes: its `cfg.expert_counts` entry, else expert_per_env."""
  out = cfg.expert_per_env
  for spec in cfg.expert_counts:
    env, eq, value = spec.partition("=")
    if not eq or env.strip() not in ENVS or not value.strip().isdigit():
      raise ValueError(f"AgentEvolConfig.expert_counts entry {spec!r}; want 'env=N' with env in {sorted(ENVS)}")
    if env.strip() == name:
      out = int(value)
  return out


def build_env(cfg: AgentEvolConfig, name: str, seed: int | None = None):
  """Env `name` at `cfg.env_seed` (or `seed`) with its `cfg.env_kwargs`."""
  kwargs = env_kwargs(cfg, name)
  try:
    return make_env(name, seed=cfg.env_seed if seed is None else seed, **kwargs)
  except TypeError as e:
    raise ValueError(f"AgentEvolConfig.env_kwargs for {name!r} = {kwargs} do not fit its constructor: {e}") from None


def expert_examples(tokenizer, cfg: AgentEvolConfig) -> list[tuple[list[int], list[int]]]:
  """D_s as (ids, agent_mask) pairs: the scripted expert on instances [0, expert_count(cfg, env)) of every env."""
  out = []
  for name in cfg.envs:
    env = build_env(cfg, name)
    for i in range(expert_count(cfg, name)):
      tr = run_expert(env, i)
      out.append(trajectory_ids(tokenizer, tr.instruction, [(agent_text(t, a), o) for t, a, o in tr.turns]))
  return out


def run_rollouts(model_config: ModelConfig, params, tokenizer, items: Sequence[tuple[str, int]], key: jax.Array,
                 cfg: MultiTurnConfig, batch: int, env_factory: Callable) -> list[Trajectory]:
  """Rollouts of (env name, instance) items in fixed-size batches (the last padded with repeats)."""
  out = []
  envs = [env_factory(n) for n, _ in items[:batch]] if items else []
  for b, start in enumerate(range(0, len(items), batch)):
    chunk = list(items[start:start + batch])
    n = len(chunk)
    chunk += [chunk[-1]] * (min(batch, len(items)) - n)
    for j, (name, _) in enumerate(chunk):  # reuse env objects; replace one whose kind differs
      if envs[j].name != name:
        envs[j] = env_factory(name)
    out += rollout(model_config, params, tokenizer, envs[:len(chunk)], [i for _, i in chunk],
                   jax.random.fold_in(key, b), cfg)[:n]
  return out


def success_table(trajs: Sequence[Trajectory], threshold: float) -> dict:
  """{env: {"success", "ci95", "n"}} over the trajectories, plus "mean" over envs."""
  res = {}
  for name in sorted({t.env for t in trajs}):
    wins = [t.reward > threshold for t in trajs if t.env == name]
    res[name] = {"success": sum(wins) / len(wins), "ci95": list(wilson_interval(sum(wins), len(wins))),
                 "n": len(wins)}
  res["mean"] = sum(v["success"] for v in res.values()) / max(len(res), 1)
  return res


def evaluate_agent(cfg: AgentEvolConfig, model_config, params, tokenizer, env_factory=None) -> dict:
  """Greedy success per env on held-out instances [EVAL_OFFSET, EVAL_OFFSET + eval_per_env)."""
  env_factory = env_factory or (lambda n: build_env(cfg, n))
  items = [(n, EVAL_OFFSET + i) for n in cfg.envs for i in range(cfg.eval_per_env)]
  greedy = dataclasses.replace(cfg.rollout, greedy=True)
  trajs = run_rollouts(model_config, params, tokenizer, items, jax.random.key(0), greedy, cfg.rollout_batch,
                       env_factory)
  res = success_table(trajs, cfg.reward_threshold)
  for name in cfg.envs:  # one greedy episode per env, for reading what the agent does
    first = next(t for t in trajs if t.env == name)
    res[name]["example"] = [f"{text!r} -> {obs!r}" for text, _, obs in first.turns[:4]]
  return res


def keep_successes(trajs: Sequence[Trajectory], threshold: float, seen: set) -> list[tuple[list[int], list[int]]]:
  """Trajectories with reward > threshold whose (env, instance, agent turns) is new; updates `seen`."""
  out = []
  for t in trajs:
    key = (t.env, t.idx, tuple(text for text, _, _ in t.turns))
    if t.reward > threshold and key not in seen:
      seen.add(key)
      out.append((list(t.tokens), list(t.agent_mask)))
  return out


def _sft(cfg: AgentEvolConfig, name: str, model_config, params, tokenizer, data, epochs: float,
         lr: float = 0.0) -> dict:
  steps = max(1, math.ceil(epochs * len(data) / cfg.sft.batch_size))
  optim = dataclasses.replace(cfg.sft.optim, lr=lr) if lr else cfg.sft.optim
  sft = dataclasses.replace(cfg.sft, run_dir=str(Path(cfg.run_dir) / name), steps=steps, checkpoint_every=steps,
                            seed=cfg.seed, optim=optim)
  return train_sft(sft, model_config, params, tokenizer, [], tokenized=data).params


def agentevol(cfg: AgentEvolConfig, model_config: ModelConfig, base_params, tokenizer, *,
              env_factory: Callable | None = None, log: Callable = print, bc: tuple | None = None,
              evaluate: Callable | None = None) -> dict:
  """Run BC then M AgentEvol iterations; returns {"bc": eval, "iterations": [{m, kept, data, eval}],
  "bc_params", "params"}.

  env_factory(name) -> Env builds the envs to explore and evaluate in (default: in-process, `cfg.env_seed`).
  bc: (params, eval) of an earlier run's BC model on the same expert data, to skip BC (arms of one experiment).
  evaluate(params) -> dict replaces `evaluate_agent` for every model (a caller with its own eval splits).
  """
  env_factory = env_factory or (lambda n: build_env(cfg, n))
  evaluate = evaluate or (lambda p: evaluate_agent(cfg, model_config, p, tokenizer, env_factory))
  t0 = time.time()
  expert = expert_examples(tokenizer, cfg)
  longest = max(len(ids) for ids, _ in expert)
  if longest > cfg.sft.max_len or longest > cfg.rollout.max_len:
    raise ValueError(f"an expert trajectory has {longest} tokens; raise sft.max_len ({cfg.sft.max_len}) and "
                     f"rollout.max_len ({cfg.rollout.max_len}) to at least that")
  if bc is None:
    log(f"[agentevol] BC on {len(expert)} expert trajectories (longest {longest} tokens)")
    bc_params = _sft(cfg, "bc", model_config, base_params, tokenizer, expert, cfg.sft_epochs)
    bc = (bc_params, evaluate(bc_params))
  bc, bc_eval = bc
  result = {"bc": bc_eval, "bc_params": bc, "iterations": [], "expert_trajectories": len(expert)}
  log(f"[agentevol] BC: {json.dumps(result['bc'])}")
  params, data, seen = bc, list(expert), set()
  explore = dataclasses.replace(cfg.rollout, temperature=cfg.explore_temperature, greedy=False)
  items = [(n, i) for n in cfg.envs for i in range(cfg.explore_per_env) for _ in range(cfg.samples_per_instruction)]
  for m in range(1, cfg.iterations + 1):
    trajs = run_rollouts(model_config, params, tokenizer, items, jax.random.key(cfg.seed * 1000 + m), explore,
                         cfg.rollout_batch, env_factory)
    kept = keep_successes(trajs, cfg.reward_threshold, seen)
    data += kept
    start = base_params if cfg.retrain == "base" else params
    params = _sft(cfg, f"iter{m}", model_config, start, tokenizer, data,
                  cfg.iteration_sft_epochs or cfg.sft_epochs, cfg.iteration_lr)
    ev = evaluate(params)
    it = {"m": m, "explore_success": success_table(trajs, cfg.reward_threshold), "kept": len(kept),
          "data": len(data), "eval": ev, "elapsed_s": round(time.time() - t0, 1)}
    result["iterations"].append(it)
    log(f"[agentevol] iteration {m}: kept {len(kept)} new, {len(data)} in all; eval {json.dumps(ev)}")
  result["params"] = params
  return result


def multiturn_grpo(rl_cfg, model_config: ModelConfig, params, tokenizer, envs: Sequence[str], *, env_seed: int = 0,
                   instances_per_env: int = 192, rollout_cfg: MultiTurnConfig = MultiTurnConfig(),
                   env_factory: Callable | None = None, success_threshold: float = SUCCESS_THRESHOLD):
  """Multi-turn GRPO on the same envs through `train_rl(..., collector=MultiTurnCollector)`; returns the state."""
  env_factory = env_factory or (lambda n: make_env(n, seed=env_seed))
  problems = [EnvProblem(n, i) for n in envs for i in range(instances_per_env)]
  collector = MultiTurnCollector(rl_cfg, model_config, tokenizer, env_factory, rollout_cfg,
                                 success_threshold=success_threshold)
  try:
    state, _ = train_rl(rl_cfg, model_config, params, tokenizer, DatasetSource(problems, seed=rl_cfg.seed),
                        collector=collector)
  finally:
    collector.close()
  return state
