"""The RL loop, as in the GRPO paper's algorithm box: sample problems, collect, K updates, feed back, log.

  for step in range(start, cfg.steps):
    problems = source.batch(step, n)                  # a ProblemSource (exrl.curriculum.source)
    experience = collector.collect(params, ref, problems, key)   # a Collector (exrl.train.experience)
    for _ in range(cfg.inner_epochs): state = step_fn(state, pack(experience.rows), ref)
    source.update(problems, experience)
    log, evaluate, checkpoint (with the source's state)

What a rollout is (single-turn groups, Delethink chunks, self-iteration, multi-turn agents) lives in the
collector; the default is `exrl.train.collect.groups.GroupCollector`. Resumable: the device state (params,
optimiser, step, PRNG key) and the source's state are checkpointed, and metrics.jsonl is truncated back
to the checkpoint on resume, so a run killed at any point and resumed ends bitwise-identical to a run
that was never interrupted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import time
from typing import Callable, Literal, Sequence

import jax

from exrl.curriculum.source import ProblemSource
from exrl.models.config import ModelConfig
from exrl.models.lora import LoraConfig
from exrl.rl import rewards as rewards_lib
from exrl.rl.advantages import AdvantageConfig
from exrl.rl.losses import LossConfig
from exrl.rollout.sampler import SamplingConfig
from exrl.tasks import pool as pool_lib
from exrl.infra import mesh as mesh_lib
from exrl.infra.resources import peak_rss_mb
from exrl.infra.trackers import TrackerName, check_names as check_trackers
from exrl.train.adapter import Adapter
from exrl.train.async_loop import train_async, uses_worker
from exrl.train.collect.groups import GroupCollector
from exrl.train.evaluate import EvalConfig, evaluate
from exrl.train.experience import Collector, device_batch
from exrl.train.objectives import rl_loss_fn
from exrl.train.state import OptimConfig, TrainState, make_optimizer, next_key
from exrl.train.trainer import check_vocab, config_json, open_run, resolve_remat

ANNOTATORS = ("online", "offline")
# The registry's names as a Literal, so --help lists every registered reward (exrl.rl.rewards.REWARDS).
RewardName = Literal[tuple(rewards_lib.REWARDS)]


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """One GRPO-family run. Defaults are small enough for a CPU."""
  run_dir: str = "runs/rl"
  steps: int = 20
  prompts_per_step: int = 8
  group_size: int = 8
  num_microbatches: int = 1
  inner_epochs: int = 1
  # a name in exrl.rl.rewards.REWARDS: verifier | self_certainty (Intuitor) | mix | entropy (RENT) | majority (TTRL)
  # | controls: noise, shuffled
  reward: RewardName = "verifier"
  mix_weights: tuple[float, float] = (1.0, 1.0)  # (verifier, self-certainty) after per-reward group norm
  sc_annotator: str = "online"  # online: the sampling policy; offline: the frozen reference (ablation)
  sampling: SamplingConfig = SamplingConfig(max_new_tokens=32, temperature=1.0)
  loss: LossConfig = LossConfig()
  advantage: AdvantageConfig = AdvantageConfig()
  optim: OptimConfig = OptimConfig(lr=1e-5)
  mesh: mesh_lib.MeshConfig = mesh_lib.MeshConfig()
  seed: int = 0
  eval_every: int = 0  # 0: evaluate only at the end
  eval: EvalConfig = EvalConfig()
  checkpoint_every: int = 5
  keep_checkpoints: int = 2
  max_skips_in_row: int = 3  # stop after this many consecutive non-finite updates
  verifier_timeout_s: float = 5.0
  restart: bool = False  # start over (damaged checkpoints are moved aside) when no checkpoint restores
  allow_config_change: bool = False  # resume under a config that changes the experiment; recorded (infra.lineage)
  kl_monitor: bool = True  # score the reference for a logged KL even when the loss does not need it (β = 0)
  remat: bool | None = None  # None: on for models of >= 100M parameters (trainer.resolve_remat)
  fp32_head: bool = False  # ScaleRL: the LM head (its input and unembedding) in fp32 when compute is bf16
  vocab_parallel: bool = True  # mesh tensor > 1: each device streams only its vocab shard (kernels.sharded)
  # padding-free update and reference forward: rows packed side by side into bins of pack_width tokens (a multiple
  # of it for longer rows; train.packing); 0 trains the padded rows as they are
  pack_width: int = 128
  lora: LoraConfig = LoraConfig()  # rank > 0: train a LoRA adapter on the frozen base (exrl.train.adapter)
  # asynchronous RL (exrl.train.async_loop): generation overlaps the updates, each batch trained <= max_lag versions
  # late; 0 is the synchronous loop. stale: what happens to a group staler than that (drop | rescore).
  max_lag: int = 0
  stale: Literal["drop", "rescore"] = "drop"
  async_schedule: Literal["free", "deterministic"] = "free"  # deterministic: batch s sampled by version s - max_lag
  # free schedule, max_lag > 0: new weights reach the generation in progress between decode steps (exrl.rollout.
  # versioned, the continuous engine's decode step whatever sampling.engine); False: between batches.
  # inflight_every: decode steps between checks for new weights (each check is a host round trip)
  inflight: bool = True
  inflight_every: int = 8
  trackers: tuple[TrackerName, ...] = ("tensorboard",)  # besides metrics.jsonl (exrl.infra.trackers)

  def __post_init__(self):
    if self.reward not in rewards_lib.REWARDS:
      raise ValueError(f"RLConfig.reward={self.reward!r}; valid: {tuple(rewards_lib.REWARDS)}")
    if self.sc_annotator not in ANNOTATORS:
      raise ValueError(f"RLConfig.sc_annotator={self.sc_annotator!r}; valid: {ANNOTATORS}")
    # Settings that only act through a reward must not be set for a reward that ignores them.
    if self.sc_annotator != "online" and rewards_lib.SELF_CERTAINTY not in rewards_lib.REWARDS[self.reward].needs:
      raise ValueError(f"RLConfig.sc_annotator={self.sc_annotator!r} has no effect with reward={self.reward!r}, "
                       f"which reads no self-certainty")
    if self.mix_weights != (1.0, 1.0) and self.reward != "mix":
      raise ValueError(f"RLConfig.mix_weights={self.mix_weights} has no effect with reward={self.reward!r}; "
                       f"set reward='mix'")
    if self.group_size < 2:
      raise ValueError(f"RLConfig.group_size={self.group_size}; group advantages need at least 2 samples")
    if self.pack_width < 0:
      raise ValueError(f"RLConfig.pack_width={self.pack_width} must be >= 0 (0 turns packing off)")
    for name in ("steps", "prompts_per_step", "num_microbatches", "inner_epochs", "checkpoint_every",
                 "keep_checkpoints", "max_skips_in_row", "inflight_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"RLConfig.{name}={getattr(self, name)} must be >= 1")
    check_trackers(self.trackers, "RLConfig.trackers")
    if self.max_lag < 0 or self.mesh.rollout_devices < 0:
      raise ValueError(f"RLConfig.max_lag={self.max_lag} and mesh.rollout_devices={self.mesh.rollout_devices} "
                       f"must be >= 0")
    if self.stale not in ("drop", "rescore") or self.async_schedule not in ("free", "deterministic"):
      raise ValueError(f"RLConfig.stale={self.stale!r} (valid: drop, rescore) / async_schedule="
                       f"{self.async_schedule!r} (valid: free, deterministic)")
    if self.max_lag and self.inner_epochs > 1:
      raise ValueError(f"RLConfig.max_lag={self.max_lag} needs inner_epochs=1 (got {self.inner_epochs}): the ratio "
                       f"is taken to the sampler's per-token behaviour log-probs")
    if self.eval_every < 0:
      raise ValueError(f"RLConfig.eval_every={self.eval_every} must be >= 0 (0: evaluate only at the end)")
    if not self.verifier_timeout_s > 0:
      raise ValueError(f"RLConfig.verifier_timeout_s={self.verifier_timeout_s} must be > 0 seconds")
    rows = self.prompts_per_step * self.group_size
    if rows % self.num_microbatches or (rows // self.num_microbatches) % self.group_size:
      raise ValueError(f"RLConfig.num_microbatches={self.num_microbatches} must split the {rows} rows "
                       f"(prompts_per_step*group_size) into whole groups of {self.group_size}")


def _log(msg: str) -> None:
  print(msg, flush=True)


def train_rl(cfg: RLConfig, model_config: ModelConfig, params, tokenizer, source: ProblemSource, *,
             collector: Collector | None = None, eval_problems: Sequence = (), verify: Callable | None = None,
             encode: Callable | None = None, on_eval: Callable | None = None) -> tuple[TrainState, dict]:
  """Run (or resume) an RL run in `cfg.run_dir`; returns (final state, final eval dict).

  source: gives each step's problems and takes feedback (`ProblemSource`); its state is checkpointed.
  collector: turns problems into an `Experience`; default `GroupCollector(cfg, ...)` (single-turn groups).
    A collector passed in is closed by its owner, not here.
  verify(text, problem) -> float scores a response (default: the problem's task verifier); encode(prompt)
  -> ids tokenises prompts. Both are used by the default collector and by evaluation.
  """
  check_vocab(model_config, tokenizer)
  encode = encode or (lambda s: tokenizer.encode(s, add_bos=True))
  pool = pool_lib.VerifierPool(timeout_s=cfg.verifier_timeout_s)  # evaluation's, and the default collector's
  pool.warm_up()  # workers start while the first step compiles and samples
  own_collector = collector is None
  collector = collector or GroupCollector(cfg, model_config, tokenizer, verify=verify, encode=encode, pool=pool)
  def run_eval(params):
    _log(f"[rl] evaluating {len(eval_problems)} problems (pass@1 x{cfg.eval.samples_per_problem}"
         f"{' + greedy' if cfg.eval.greedy else ''})")
    return evaluate(model_config, adapter.policy(params), tokenizer, eval_problems, verify, cfg.eval, encode, pool=pool)

  optimizer = make_optimizer(cfg.optim, cfg.steps * cfg.inner_epochs)
  # The frozen reference (KL, offline annotator) is the caller's params themselves, never a copy: the train
  # state holds its own copy (the only one donated), and on one device placing them on the mesh is a no-op.
  adapter = Adapter(cfg.lora, model_config, params, cfg.seed)  # the identity unless cfg.lora.rank > 0
  ref_params = adapter.base  # with LoRA: the frozen base, the adapter off
  del params  # the adapter holds what the run needs: a caller that dropped its tree frees an unquantised base
  gc.collect()  # now, not at some later collection: arrays in reference cycles (jit tracing) held 0.3 GB of it
  # Full fine-tuning whose loss and collector never read the reference (kl_beta 0, no KL monitor, online
  # annotator) keeps no reference: the train state's copy of the weights is the only one.
  keep_ref = cfg.lora.on or cfg.loss.kl_beta > 0 or getattr(collector, "with_ref", True)
  bar_fields = {"reward": "reward_mean", "acc": "accuracy", "sc": "self_certainty_reward", "len": "response_len",
                "kl": "kl"}
  final_eval = {}
  try:
    with open_run(cfg.run_dir, cfg, model_config, adapter.trainable, optimizer=optimizer, seed=cfg.seed,
                  mesh_config=cfg.mesh,
                  loss_fn=adapter.wrap(rl_loss_fn(model_config, cfg.loss, remat=resolve_remat(cfg.remat, model_config),
                                     on_policy=cfg.inner_epochs == 1 and (cfg.max_lag == 0 or cfg.loss.tis_cap > 0),
                                     temperature=1.0 if cfg.sampling.greedy else cfg.sampling.temperature,
                                     fp32_head=cfg.fp32_head,
                                     mesh=mesh_lib.make_mesh(cfg.mesh) if cfg.vocab_parallel else None)),
                  keep_checkpoints=cfg.keep_checkpoints,
                  total_steps=cfg.steps, bar_fields=bar_fields, desc="rl",
                  frozen_shardings_like_params=not cfg.lora.on and keep_ref,
                  restart=cfg.restart, frozen=ref_params if keep_ref else None,
                  allow_config_change=cfg.allow_config_change, trackers=cfg.trackers) as run:
      if not keep_ref:
        adapter.release()
      prompts = _prompts_per_process(cfg, run.mesh, source)
      ref_params = adapter.place_base(run.mesh, run.state_shardings.params)
      if run.start:
        adapter.check_resume(run.meta)
        source.load_state_dict(run.meta["source"])
      _log(f"[rl] step {run.start + 1} compiles the sampler and the train step (once per shape; cached on disk)")
      end_step = functools.partial(
          _end_step, cfg, run, run_eval=run_eval, on_eval=on_eval, eval_problems=eval_problems,
          save_meta=lambda: {"source": source.state_dict(), "config": config_json(cfg), **adapter.meta})
      worker = uses_worker(cfg)  # PipelineRL-k or a rollout mesh (exrl.train.async_loop); else the loop below
      if worker:
        train_async(cfg, run, collector, adapter, ref_params, source, prompts, model_config=model_config,
                    check_skips=_check_skips, end_step=end_step)
      for step in range(run.start, cfg.steps) if not worker else ():
        t0 = time.time()
        problems = source.batch(step, prompts)  # this process's own problems
        run.state, key = next_key(run.state)
        exp = collector.collect(adapter.policy(run.state.params), ref_params, problems, key)
        t_collect = time.time()
        batch, shape = device_batch(exp.rows, cfg.num_microbatches, cfg.pack_width, run.mesh)
        for _ in range(cfg.inner_epochs):
          run.state, train_metrics = run.step_fn(run.state, batch, ref_params)
        source.update(problems, exp)
        metrics = {**exp.metrics, **jax.device_get(train_metrics)}
        _check_skips(cfg, metrics, run, step)
        t_update = time.time()  # device_get above waited for the update
        timing = {**exp.timing, "update_s": t_update - t_collect, "step_s": t_update - t0, **shape}
        end_step(step, metrics, timing)
      if eval_problems:
        final_eval = run_eval(run.state.params)
        (run.run_dir / "eval.json").write_text(json.dumps(final_eval, indent=2))
        run.writer.summary({f"eval/{k}": v for k, v in final_eval.items()})
      state = run.state
  finally:
    if own_collector:
      collector.close()
    pool.close()
  _log(f"[rl] peak host RSS {peak_rss_mb():,.0f} MB")
  return state, final_eval


def _prompts_per_process(cfg: RLConfig, mesh, source) -> int:
  """Each process asks its source for its own share of the step's prompts and builds only those rows."""
  procs = jax.process_count()
  if procs == 1:
    return cfg.prompts_per_step
  if not getattr(source, "per_process", False):
    raise ValueError(f"{type(source).__name__} yields the same problems on every process; a multi-host run needs a "
                     f"source with per_process = True (exrl.curriculum.source), so each host builds its own rows")
  if cfg.prompts_per_step % procs or mesh_lib.batch_divisor(mesh) % procs:
    raise ValueError(f"RLConfig.prompts_per_step={cfg.prompts_per_step} and the mesh's data*fsdp="
                     f"{mesh_lib.batch_divisor(mesh)} must both split over the {procs} processes")
  n = cfg.prompts_per_step // procs
  _log(f"[rl] process {jax.process_index()}/{procs} builds {n * cfg.group_size} of "
       f"{cfg.prompts_per_step * cfg.group_size} rollouts per step")
  return n


def _end_step(cfg: RLConfig, run, step: int, metrics: dict, timing: dict, *, run_eval, on_eval, eval_problems,
              save_meta, eval_lock=contextlib.nullcontext()) -> None:
  """Every step's tail, with or without a rollout worker: evaluate (every eval_every steps, holding eval_lock), log,
  checkpoint (every checkpoint_every steps and at the end; save_meta() -> the source's state and the config)."""
  if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps and eval_problems:
    with eval_lock:
      ev = run_eval(run.state.params)
    metrics.update({f"eval/{k}": v for k, v in ev.items() if isinstance(v, float)})
    if on_eval:
      on_eval(step + 1, ev)
  run.writer.write(step + 1, metrics, timing)
  run.bar.update(step + 1, metrics)
  if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
    run.save(step + 1, save_meta())


def _check_skips(cfg: RLConfig, metrics: dict, run, step: int) -> None:
  if metrics["skipped_in_row"] >= cfg.max_skips_in_row:
    run.ckpt.wait()  # an in-flight save of a (skipped, so unchanged) state is still a good one
    raise FloatingPointError(
        f"step {step + 1}: {int(metrics['skipped_in_row'])} consecutive updates had a non-finite loss or "
        f"gradient (max_skips_in_row={cfg.max_skips_in_row}); stopping. The last good checkpoint "
        f"(step {run.ckpt.latest_step()}) in {run.run_dir / 'ckpt'} is intact.")
