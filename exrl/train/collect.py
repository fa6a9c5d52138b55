"""Single-turn group rollouts (GRPO / Intuitor): the first `Collector` of the RL loop's `collect` seam.

Each problem is sampled `group_size` times; rows are prompt + completion. The reward is the verifier's
(time-bounded worker processes), self-certainty (Intuitor: no labels), or both normalised per group and
mixed. The rollout is re-scored without gradient for old and reference log-probs and self-certainty.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from exrl.models.config import ModelConfig
from exrl.rl.advantages import compute_advantages
from exrl.rollout.sampler import pad_prompts, sample
from exrl.tasks import pool as pool_lib
from exrl.train.evaluate import decode_completion
from exrl.train.experience import Experience, score


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


class GroupCollector:
  """`collect(params, ref_params, problems, key) -> Experience` for one prompt + one completion per row.

  cfg: an `RLConfig` (group_size, reward, mix_weights, sc_annotator, sampling, advantage,
    verifier_timeout_s are read). verify: picklable `(text, problem) -> float`; None looks the verifier up
    by `problem.task`. encode: prompt text -> ids (default: tokenizer with bos).
  """

  def __init__(self, cfg, model_config: ModelConfig, tokenizer, *, verify: Callable | None = None,
               encode: Callable | None = None, pool: pool_lib.VerifierPool | None = None):
    self.cfg, self.model_config, self.tokenizer, self.verify = cfg, model_config, tokenizer, verify
    self.encode = encode or (lambda s: tokenizer.encode(s, add_bos=True))
    self.sampling = dataclasses.replace(
        cfg.sampling, stop_token_ids=cfg.sampling.stop_token_ids or tuple(tokenizer.stop_ids), pad_id=tokenizer.pad_id)
    self._own_pool = pool is None
    self.pool = pool or pool_lib.VerifierPool(timeout_s=cfg.verifier_timeout_s)

  def collect(self, params, ref_params, problems: Sequence, key: jax.Array) -> Experience:
    cfg, G = self.cfg, self.cfg.group_size
    t0 = time.time()
    rollout_problems = [p for p in problems for _ in range(G)]
    tokens, valid = pad_prompts([self.encode(p.prompt) for p in rollout_problems], self.tokenizer.pad_id)
    out = sample(self.model_config, params, tokens, valid, key, self.sampling)
    response = jnp.concatenate([jnp.zeros_like(valid), out.mask_BxN], axis=1)
    # The reference is always scored: its log-probs give the k3 KL (loss and monitoring) and the
    # offline annotator's self-certainty.
    scored = score(self.model_config, params, ref_params, out.seq_tokens_BxS, out.seq_valid_BxS,
                   out.seq_positions_BxS, response, with_ref=True)
    sc_B = scored["ref_sc_B"] if cfg.sc_annotator == "offline" else scored["sc_B"]
    t_sample = time.time()
    comp_tokens, comp_mask, sc_host, lengths = jax.device_get((out.tokens_BxN, out.mask_BxN, sc_B, out.lengths_B))
    texts = [decode_completion(self.tokenizer, t[m].tolist()) for t, m in zip(comp_tokens, comp_mask)]
    correct, vinfo = pool_lib.verifier_rewards(texts, rollout_problems, self.verify, pool=self.pool)
    reward_cols = {"verifier": [correct], "self_certainty": [sc_host], "mix": [correct, sc_host]}[cfg.reward]
    rewards_BxR = np.stack(reward_cols, axis=1).astype(np.float32)
    weights = np.asarray(cfg.mix_weights, np.float32) if cfg.reward == "mix" else None
    adv_B, keep_B = jax.device_get(compute_advantages(rewards_BxR, cfg.advantage, G, weights))
    host = jax.device_get({"tokens": out.seq_tokens_BxS, "valid": out.seq_valid_BxS,
                           "positions": out.seq_positions_BxS, "old_logp": scored["logp"],
                           "ref_logp": scored["ref_logp"], "response": response})
    B = len(rollout_problems)
    rows = {k: host[k] for k in ("tokens", "valid", "positions", "old_logp", "ref_logp")}
    rows.update(loss_mask=np.asarray(host["response"], np.float32) * np.asarray(keep_B, np.float32)[:, None],
                adv=np.asarray(adv_B, np.float32), trace_id=np.arange(B, dtype=np.int32),
                group_id=(np.arange(B) // G).astype(np.int32))
    total_B = rewards_BxR @ (weights if weights is not None else np.ones(1, np.float32))
    traces = {"problem": np.arange(B) // G, "text": texts, "reward": total_B, "length": np.asarray(lengths),
              "correct": np.asarray(correct), "self_certainty": np.asarray(sc_host)}
    metrics = {
        "reward_mean": float(np.mean(total_B)), "reward_std": float(np.std(total_B)),
        "accuracy": float(np.mean(correct)), "self_certainty_reward": float(np.mean(sc_host)),
        "response_len": float(np.mean(lengths)), "sc_acc_corr": group_correlation(sc_host, correct, G),
        "zero_var_frac": float(1 - np.mean(keep_B)), "verifier_timeouts": vinfo["verifier_timeouts"],
        "verifier_errors": vinfo["verifier_errors"],
    }
    timing = {"sample_s": t_sample - t0, "tokens_per_s": float(np.sum(lengths)) / max(t_sample - t0, 1e-9)}
    return Experience(rows=rows, traces=traces, metrics=metrics, timing=timing)

  def close(self) -> None:
    if self._own_pool:
      self.pool.close()
