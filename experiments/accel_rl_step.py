"""The accelerator report's RL-step section: one GRPO step, compiled stage by stage and timed stage by stage.

The stages are the loop's (exrl.train.rl_loop): sample (the static KV-cache sampler, U prompts × G samples),
score (reference-model log-probs for the k3 KL, one forward), reward + advantages (a token-parity reward on the
device, then GRPO group normalisation) and update (`make_train_step`: fwd+bwd through the fused token statistics,
gradient accumulation over micro-batches, AdamW). Mixed precision as the loop runs it: fp32 params and optimizer,
bf16 compute. Each stage is lowered and compiled explicitly (compile seconds), then run `repeats` times.
MFU of the update = accel_env.train_flops over the padded rows / update seconds / the table's peak.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import accel_env
from exrl.rl.advantages import AdvantageConfig, compute_advantages
from exrl.rl.losses import LossConfig
from exrl.rollout import sampler
from exrl.train.objectives import rl_loss_fn, shifted_stats
from exrl.train.state import OptimConfig, init_state, make_optimizer
from exrl.train.step import make_train_step


def _compile(fn, *args):
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile() if not hasattr(fn, "lower") else fn.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def _timed(compiled, *args):
  t0 = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  return out, time.perf_counter() - t0


def _score(config, ref_params, tokens_BxT, valid_BxT, positions_BxT):
  """Reference log-probs of tokens[:, 1:], left-padded with a 0 column to [B, T] as the batch stores them."""
  stats = shifted_stats(config, ref_params, {"tokens": tokens_BxT, "valid": valid_BxT, "positions": positions_BxT})
  return jnp.pad(stats.logp, ((0, 0), (1, 0)))


def _reward_and_advantage(tokens_BxN, mask_BxN, group_size):
  """Reward = the share of even token ids in the completion (cheap, on device, varies within a group)."""
  even_B = jnp.sum((tokens_BxN % 2 == 0) & mask_BxN, axis=1) / jnp.maximum(jnp.sum(mask_BxN, axis=1), 1)
  adv_B, _ = compute_advantages(even_B.astype(jnp.float32), AdvantageConfig(), group_size)
  return even_B, adv_B


def _batch(out, ref_logp_BxT, adv_B, old_logp_BxT, prompt_len, group_size, micro):
  """The train step's [M, B/M, ...] batch; the loss covers completion tokens only."""
  B, T = out.seq_tokens_BxS.shape
  loss_mask_BxT = jnp.concatenate([jnp.zeros((B, prompt_len), bool), out.mask_BxN], axis=1)
  rows = jnp.arange(B, dtype=jnp.int32)
  fields = {"tokens": out.seq_tokens_BxS, "valid": out.seq_valid_BxS, "positions": out.seq_positions_BxS,
            "loss_mask": loss_mask_BxT.astype(jnp.float32), "old_logp": old_logp_BxT, "ref_logp": ref_logp_BxT,
            "adv": adv_B, "trace_id": rows, "group_id": rows // group_size}
  return {k: x.reshape(micro, B // micro, *x.shape[1:]) for k, x in fields.items()}


def run(ckpt, prompts: int, group_size: int, prompt_len: int, new_tokens: int, micro: int, repeats: int,
        peak_flops: float | None, matmul_flops: float | None, put, deadline: float) -> dict:
  config, params = ckpt.load("float32", "bfloat16")
  B = prompts * group_size
  if B % micro:
    raise ValueError(f"rows {B} must divide into {micro} micro-batches")
  ref_params = jax.tree.map(jnp.copy, params)  # its own buffers: the step donates the state's
  opt = make_optimizer(OptimConfig(lr=1e-6), 10)
  state = init_state(params, opt, 0)
  del params
  prompts_UxP = jnp.asarray(np.random.default_rng(1).integers(1, config.vocab_size, (prompts, prompt_len)), jnp.int32)
  valid_UxP = jnp.ones_like(prompts_UxP, bool)
  sampling = sampler.SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)
  out = {"rows": B, "prompts": prompts, "group_size": group_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
         "micro_batches": micro, "precision": "fp32 params/optimizer, bf16 compute", "loss_config": "ppo, k3 KL beta 0.04",
         "compile_s": {}, "stage_s": {}}
  gen = functools.partial(sampler.generate, config, sampling, num_samples=group_size)
  loss_fn = rl_loss_fn(config, LossConfig(kl_beta=0.04), implementation="auto")
  step = make_train_step(loss_fn, opt)
  compiled = {}
  for i in range(repeats + 1):  # pass 0 compiles each stage first; every pass runs and times each stage
    if time.monotonic() > deadline:
      out["skipped"] = f"section deadline passed after {i} of {repeats + 1} passes"
      break
    key = jax.random.key(i)
    if i == 0:
      compiled["sample"], out["compile_s"]["sample"] = _compile(gen, state.params, prompts_UxP, valid_UxP, key)
      put("result", out)
    sample, t_sample = _timed(compiled["sample"], state.params, prompts_UxP, valid_UxP, key)
    seq = (sample.seq_tokens_BxS, sample.seq_valid_BxS, sample.seq_positions_BxS)
    if i == 0:
      compiled["score"], out["compile_s"]["score"] = _compile(functools.partial(_score, config), ref_params, *seq)
      compiled["reward"], out["compile_s"]["reward"] = _compile(
          functools.partial(_reward_and_advantage, group_size=group_size), sample.tokens_BxN, sample.mask_BxN)
    ref_logp, t_score = _timed(compiled["score"], ref_params, *seq)
    (reward_B, adv_B), t_reward = _timed(compiled["reward"], sample.tokens_BxN, sample.mask_BxN)
    # On-policy single epoch: the sampler's own log-probs are the old log-probs (as the loop uses them).
    old_logp = jnp.pad(sample.logp_BxN, ((0, 0), (prompt_len, 0)))
    batch = _batch(sample, ref_logp, adv_B, old_logp, prompt_len, group_size, micro)
    if i == 0:
      compiled["update"], out["compile_s"]["update"] = _compile(step, state, batch, ref_params)
      put("result", out)
    (state, metrics), t_update = _timed(compiled["update"], state, batch, ref_params)
    times = {"sample": t_sample, "score": t_score, "reward": t_reward, "update": t_update}
    for k, t in times.items():
      out["stage_s"].setdefault(k, []).append(t)
    out["final_loss"], out["mean_reward"] = float(metrics["loss"]), float(jnp.mean(reward_B))
    _summarise(out, config, B, prompt_len + new_tokens, peak_flops, matmul_flops)
    put("result", out)
  return out


def _summarise(out, config, rows, width, peak_flops, matmul_flops):
  """Steady stage seconds (the fastest pass after the compiling one, or that one alone) and the update's MFU
  against the table peak and, as a cross-check, against this run's timed bf16 matmul."""
  stage = {k: min(v[1:] or v) for k, v in out["stage_s"].items()}
  out["steady_stage_s"] = stage
  out["steady_step_s"] = sum(stage.values())
  out["update_model_flops"] = accel_env.train_flops(config, rows, width)
  out["update_tflops_per_s"] = out["update_model_flops"] / stage["update"] / 1e12
  out["completion_tokens_per_s"] = rows * out["new_tokens"] / stage["sample"]
  if peak_flops:
    out["update_mfu"] = accel_env.mfu(out["update_model_flops"], stage["update"], peak_flops)
  if matmul_flops:
    out["update_mfu_vs_timed_matmul"] = accel_env.mfu(out["update_model_flops"], stage["update"], matmul_flops)
