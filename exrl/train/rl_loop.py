"""The RL loop: rollout -> reward -> advantages -> train step(s) -> metrics -> eval / checkpoint.

Resumable: the device state (params, optimiser, step, PRNG key) is checkpointed with orbax, the
prompt source is a pure function of the step, and metrics.jsonl is truncated back to the
checkpoint on resume, so a run killed at any point and resumed ends bitwise-identical to a run
that was never interrupted.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from exrl.models import decoder
from exrl.models.config import ModelConfig
from exrl.tasks import pool as pool_lib
from exrl.rl.advantages import AdvantageConfig, compute_advantages
from exrl.rl.losses import LossConfig
from exrl.tasks import get_verifier
from exrl.rollout.sampler import SamplingConfig, pad_prompts, sample
from exrl.train import mesh as mesh_lib
from exrl.train.checkpoint import Checkpointer
from exrl.train.evaluate import EvalConfig, decode_completion, evaluate
from exrl.train.experience import pack_microbatches, score
from exrl.train.metrics import MetricsWriter, ProgressBar
from exrl.train.objectives import rl_loss_fn
from exrl.train.state import OptimConfig, TrainState, init_state, make_optimizer, next_key
from exrl.train.step import make_train_step, shard_batch

REWARDS = ("verifier", "self_certainty", "mix")
ANNOTATORS = ("online", "offline")


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """One GRPO-family run. Defaults are small enough for a CPU."""
  run_dir: str = "runs/rl"
  steps: int = 20
  prompts_per_step: int = 8
  group_size: int = 8
  num_microbatches: int = 1
  inner_epochs: int = 1
  reward: str = "verifier"  # verifier | self_certainty (Intuitor, no labels) | mix
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
  remat: bool = False

  def __post_init__(self):
    if self.reward not in REWARDS:
      raise ValueError(f"RLConfig.reward={self.reward!r}; valid: {REWARDS}")
    if self.sc_annotator not in ANNOTATORS:
      raise ValueError(f"RLConfig.sc_annotator={self.sc_annotator!r}; valid: {ANNOTATORS}")
    if self.group_size < 2:
      raise ValueError(f"RLConfig.group_size={self.group_size}; group advantages need at least 2 samples")
    if self.steps < 1 or self.prompts_per_step < 1:
      raise ValueError(f"RLConfig.steps={self.steps} and prompts_per_step={self.prompts_per_step} must be >= 1")
    rows = self.prompts_per_step * self.group_size
    if rows % self.num_microbatches or (rows // self.num_microbatches) % self.group_size:
      raise ValueError(f"RLConfig.num_microbatches={self.num_microbatches} must split the {rows} rows "
                       f"(prompts_per_step*group_size) into whole groups of {self.group_size}")


def check_vocab(model_config: ModelConfig, tokenizer) -> None:
  if tokenizer.vocab_size > model_config.vocab_size:
    raise ValueError(f"tokenizer vocab_size={tokenizer.vocab_size} exceeds the model's "
                     f"vocab_size={model_config.vocab_size}; they must match (the model may pad up)")


def check_mesh_batch(mesh, rows_per_microbatch: int, field: str) -> None:
  div = mesh_lib.batch_divisor(mesh)
  if rows_per_microbatch % div:
    raise ValueError(f"{field}: {rows_per_microbatch} rows per micro-batch are not divisible by data*fsdp={div} "
                     f"of the mesh {dict(mesh.shape)}")


def setup_state(model_config, params, optimizer, seed, mesh):
  """Shard params by the logical-axis rules and build the train state on the mesh."""
  shardings = mesh_lib.param_shardings(params, decoder.param_axes(model_config), mesh)
  params = jax.device_put(params, shardings)
  state = jax.jit(lambda p: init_state(p, optimizer, seed))(params)
  return state, jax.tree.map(lambda x: x.sharding, state)


def group_correlation(x_B, y_B, group_size: int) -> float:
  """Mean within-group correlation of x and y (groups with no variance in either are skipped; 0 if none).

  With x = self-certainty and y = verifier reward it says whether the model's confidence ranks its own
  samples the way the verifier does, which is what Intuitor relies on.
  """
  x = np.asarray(x_B, np.float64).reshape(-1, group_size)
  y = np.asarray(y_B, np.float64).reshape(-1, group_size)
  xc, yc = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
  denom = np.sqrt((xc ** 2).sum(1) * (yc ** 2).sum(1))
  ok = denom > 1e-12
  return float(np.mean((xc * yc).sum(1)[ok] / denom[ok])) if ok.any() else 0.0


def _log(msg: str) -> None:
  print(msg, flush=True)


def train_rl(cfg: RLConfig, model_config: ModelConfig, params, tokenizer, source, *,
             eval_problems: Sequence = (), verify: Callable | None = None, encode: Callable | None = None,
             on_eval: Callable | None = None) -> tuple[TrainState, dict]:
  """Run (or resume) an RL run in `cfg.run_dir`; returns (final state, final eval dict).

  `source.batch(step, n)` gives problems; `verify(text, problem) -> float` scores a response
  (defaults to the problem's task verifier); `encode(prompt) -> ids` tokenises prompts.
  """
  check_vocab(model_config, tokenizer)
  run_dir = Path(cfg.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  rows = cfg.prompts_per_step * cfg.group_size
  check_mesh_batch(mesh, rows // cfg.num_microbatches, "RLConfig.prompts_per_step*group_size/num_microbatches")
  encode = encode or (lambda s: tokenizer.encode(s, add_bos=True))
  eval_verify = verify or (lambda text, problem: get_verifier(problem.task)(text, problem))
  sampling = dataclasses.replace(cfg.sampling, stop_token_ids=cfg.sampling.stop_token_ids or tuple(tokenizer.stop_ids),
                                 pad_id=tokenizer.pad_id)

  optimizer = make_optimizer(cfg.optim, cfg.steps * cfg.inner_epochs)
  ref_params = jax.tree.map(jnp.copy, params)  # frozen reference / offline annotator
  state, state_sh = setup_state(model_config, params, optimizer, cfg.seed, mesh)
  ref_params = jax.device_put(ref_params, state_sh.params)
  step_fn = make_train_step(rl_loss_fn(model_config, cfg.loss, remat=cfg.remat), optimizer, mesh, state_sh,
                            state_sh.params)

  pool = pool_lib.VerifierPool(timeout_s=cfg.verifier_timeout_s)
  ckpt = Checkpointer(run_dir / "ckpt", keep=cfg.keep_checkpoints)
  start = ckpt.latest_step() or 0
  if start:
    state, meta = ckpt.restore(start, abstract_state=state)
    _log(f"resumed from {run_dir / 'ckpt'} at step {start}")
  writer = MetricsWriter(run_dir, resume_step=start if start else None)
  config_json = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
  (run_dir / "config.json").write_text(json.dumps(config_json, indent=2))
  bar = ProgressBar(cfg.steps, {"reward": "reward_mean", "acc": "accuracy", "sc": "self_certainty",
                                "len": "response_len", "kl": "kl"}, initial=start)
  final_eval = {}
  try:
    for step in range(start, cfg.steps):
      t0 = time.time()
      problems = source.batch(step, cfg.prompts_per_step)
      rollout_problems = [p for p in problems for _ in range(cfg.group_size)]
      tokens, valid = pad_prompts([encode(p.prompt) for p in rollout_problems], tokenizer.pad_id)
      state, key = next_key(state)
      out = sample(model_config, state.params, tokens, valid, key, sampling)
      response = jnp.concatenate([jnp.zeros_like(valid), out.mask_BxN], axis=1)
      # The reference is always scored: its log-probs give the k3 KL (loss and monitoring) and the
      # offline annotator's self-certainty.
      scored = score(model_config, state.params, ref_params, out.seq_tokens_BxS, out.seq_valid_BxS,
                     out.seq_positions_BxS, response, with_ref=True)
      sc_B = scored["ref_sc_B"] if cfg.sc_annotator == "offline" else scored["sc_B"]
      t_sample = time.time()
      comp_tokens, comp_mask, sc_host, lengths = jax.device_get((out.tokens_BxN, out.mask_BxN, sc_B, out.lengths_B))
      texts = [decode_completion(tokenizer, t[m].tolist()) for t, m in zip(comp_tokens, comp_mask)]
      correct, vinfo = pool_lib.verifier_rewards(texts, rollout_problems, verify, pool=pool)
      reward_cols = {"verifier": [correct], "self_certainty": [sc_host], "mix": [correct, sc_host]}[cfg.reward]
      rewards_BxR = np.stack(reward_cols, axis=1).astype(np.float32)
      weights = np.asarray(cfg.mix_weights, np.float32) if cfg.reward == "mix" else None
      adv_B, keep_B = jax.device_get(compute_advantages(rewards_BxR, cfg.advantage, cfg.group_size, weights))
      response_host = np.asarray(jax.device_get(response), np.float32)
      loss_mask = response_host * np.asarray(keep_B, np.float32)[:, None]
      host = jax.device_get({"tokens": out.seq_tokens_BxS, "valid": out.seq_valid_BxS,
                             "positions": out.seq_positions_BxS, "old_logp": scored["logp"]})
      host.update(loss_mask=loss_mask, adv=np.asarray(adv_B, np.float32))
      host["ref_logp"] = np.asarray(jax.device_get(scored["ref_logp"]))
      batch = shard_batch(pack_microbatches(host, cfg.num_microbatches, cfg.group_size), mesh)
      for _ in range(cfg.inner_epochs):
        state, train_metrics = step_fn(state, batch, ref_params)
      train_metrics = jax.device_get(train_metrics)
      sc_corr = group_correlation(sc_host, correct, cfg.group_size)
      total_reward = rewards_BxR @ (weights if weights is not None else np.ones(1, np.float32))
      metrics = {
          "reward_mean": float(np.mean(total_reward)), "reward_std": float(np.std(total_reward)),
          "accuracy": float(np.mean(correct)), "self_certainty_reward": float(np.mean(sc_host)),
          "response_len": float(np.mean(lengths)), "sc_acc_corr": sc_corr, "zero_var_frac": float(1 - np.mean(keep_B)),
          "verifier_timeouts": vinfo["verifier_timeouts"], "verifier_errors": vinfo["verifier_errors"],
          **{k: float(v) for k, v in train_metrics.items()},
      }
      d = (host["ref_logp"] - host["old_logp"]) * response_host  # k3 KL(policy ‖ ref) on response tokens
      metrics["kl"] = float(np.sum(np.exp(d) - d - 1) / max(response_host.sum(), 1))
      if metrics["skipped_in_row"] >= cfg.max_skips_in_row:
        ckpt.wait()  # an in-flight save of a (skipped, so unchanged) state is still a good one
        raise FloatingPointError(
            f"step {step + 1}: {int(metrics['skipped_in_row'])} consecutive updates had a non-finite loss or "
            f"gradient (max_skips_in_row={cfg.max_skips_in_row}); stopping. The last good checkpoint "
            f"(step {ckpt.latest_step()}) in {run_dir / 'ckpt'} is intact.")
      t_end = time.time()
      timing = {"step_s": t_end - t0, "sample_s": t_sample - t0,
                "tokens_per_s": float(np.sum(lengths)) / max(t_sample - t0, 1e-9)}
      if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and (step + 1) < cfg.steps and eval_problems:
        ev = evaluate(model_config, state.params, tokenizer, eval_problems, eval_verify, cfg.eval, encode)
        metrics.update({f"eval/{k}": v for k, v in ev.items() if isinstance(v, float)})
        if on_eval:
          on_eval(step + 1, ev)
      writer.write(step + 1, metrics, timing)
      bar.update(step + 1, metrics)
      if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
        ckpt.save(step + 1, state, {"step": step + 1, "source": source.state_dict(), "config": config_json},
                  force=True)
    if eval_problems:
      final_eval = evaluate(model_config, state.params, tokenizer, eval_problems, eval_verify, cfg.eval, encode)
      (run_dir / "eval.json").write_text(json.dumps(final_eval, indent=2))
  finally:
    pool.close()
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  return state, final_eval
