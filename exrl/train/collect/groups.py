"""Single-turn group rollouts (GRPO / Intuitor): the first `Collector` of the RL loop's `collect` seam.

Each problem is sampled `group_size` times; rows are prompt + completion. The reward is the verifier's
(time-bounded worker processes), self-certainty (Intuitor: no labels), or both normalised per group and
mixed; or another label-free reward (negative token entropy, RENT; agreement with the group's majority
answer, TTRL); or a control (i.i.d. noise; self-certainty shuffled within its group). Accuracy is always
measured by the verifier, whatever the reward.
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
from exrl.rl import rewards as rewards_lib
from exrl.rl.losses import k3_kl
from exrl.rollout.sampler import bucket_length, pad_prompts, sample
from exrl.tasks import pool as pool_lib
from exrl.tasks.math_data import extract_answer
from exrl.train.evaluate import decode_completion
from exrl.train.experience import Experience, score


TRIM_BUCKET = 16  # completions are trimmed to the longest sampled one, rounded up to this: few compiled widths


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

  cfg: an `RLConfig` (group_size, reward, mix_weights, sc_annotator, sampling, advantage, loss, inner_epochs,
    kl_monitor, verifier_timeout_s, pack_width are read). With one inner epoch the policy is not re-scored: old
    log-probs and self-certainty come from the sampler, at the sampling temperature. verify: picklable `(text, problem) -> float`; None looks the verifier up
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
    T = 1.0 if self.sampling.greedy else self.sampling.temperature
    t0 = time.perf_counter()
    rollout_problems = [p for p in problems for _ in range(G)]
    # Each prompt is prefilled once and sampled G times (rows of a group adjacent, as in rollout_problems).
    tokens_UxP, valid_UxP = pad_prompts([self.encode(p.prompt) for p in problems], self.tokenizer.pad_id)
    out = sample(self.model_config, params, tokens_UxP, valid_UxP, key, self.sampling, num_samples=G)
    valid = np.repeat(valid_UxP, G, axis=0)
    lengths = np.asarray(jax.device_get(out.lengths_B))  # waits for the sampler: sample_s is real
    t_sample = time.perf_counter()
    # Trim to the longest completion, bucketed, so the update never pays for unused max_new_tokens.
    P, N = tokens_UxP.shape[1], self.sampling.max_new_tokens
    n = min(N, bucket_length(max(int(lengths.max()), 1), TRIM_BUCKET))
    seq = {"tokens": out.seq_tokens_BxS[:, :P + n], "valid": out.seq_valid_BxS[:, :P + n],
           "positions": out.seq_positions_BxS[:, :P + n]}
    response = jnp.concatenate([jnp.zeros_like(valid), out.mask_BxN[:, :n]], axis=1)
    # One policy pass only when the old log-probs must outlive an update (several inner epochs); else the
    # sampler's statistics serve. The reference runs when the loss, the annotator or monitoring needs it.
    with_policy = cfg.inner_epochs > 1
    with_ref = ((cfg.loss.kl_beta > 0 and cfg.loss.kl_estimator == "k3") or cfg.sc_annotator == "offline"
                or cfg.kl_monitor)
    scored = {}
    if with_policy or with_ref:
      scored = score(self.model_config, params, ref_params, seq["tokens"], seq["valid"], seq["positions"], response,
                     with_ref=with_ref, with_policy=with_policy, temperature=T, pack_width=cfg.pack_width)
    host = jax.device_get({**seq, **scored, "response": response, "tokens_BxN": out.tokens_BxN[:, :n],
                           "mask_BxN": out.mask_BxN[:, :n], "logp_BxN": out.logp_BxN[:, :n],
                           "sc_BxN": out.self_certainty_BxN[:, :n], "entropy_BxN": out.entropy_BxN[:, :n]})
    t_score = time.perf_counter()
    mask_BxN = host["mask_BxN"]
    count_B = np.maximum(mask_BxN.sum(1), 1)
    sampler_sc_B = (host["sc_BxN"] * mask_BxN).sum(1) / count_B
    sc_B = host["ref_sc_B"] if cfg.sc_annotator == "offline" else host.get("sc_B", sampler_sc_B)
    texts = [decode_completion(self.tokenizer, t[m].tolist()) for t, m in zip(host["tokens_BxN"], mask_BxN)]
    correct, vinfo = pool_lib.verifier_rewards(texts, rollout_problems, self.verify, pool=self.pool)
    t_reward = time.perf_counter()
    rewards_BxR = np.stack(self._reward_columns(correct, sc_B, host, texts, key), axis=1).astype(np.float32)
    weights = np.asarray(cfg.mix_weights, np.float32) if cfg.reward == "mix" else None
    adv_B, keep_B = jax.device_get(compute_advantages(rewards_BxR, cfg.advantage, G, weights))
    B = len(rollout_problems)
    resp = np.asarray(host["response"], np.float32)
    old_logp = host["logp"] if with_policy else np.pad(host["logp_BxN"], ((0, 0), (P, 0)))
    rows = {"tokens": host["tokens"], "valid": host["valid"], "positions": host["positions"],
            "loss_mask": resp * np.asarray(keep_B, np.float32)[:, None], "old_logp": old_logp,
            "ref_logp": host["ref_logp"] if with_ref else old_logp, "adv": np.asarray(adv_B, np.float32),
            "trace_id": np.arange(B, dtype=np.int32), "group_id": (np.arange(B) // G).astype(np.int32)}
    total_B = rewards_BxR @ (weights if weights is not None else np.ones(1, np.float32))
    traces = {"problem": np.arange(B) // G, "text": texts, "reward": total_B, "length": lengths,
              "correct": np.asarray(correct), "self_certainty": np.asarray(sc_B)}
    metrics = {
        "reward_mean": float(np.mean(total_B)), "reward_std": float(np.std(total_B)),
        "accuracy": float(np.mean(correct)), "self_certainty_reward": float(np.mean(sc_B)),
        "response_len": float(np.mean(lengths)), "sc_acc_corr": group_correlation(sc_B, correct, G),
        "zero_var_frac": float(1 - np.mean(keep_B)), "verifier_timeouts": vinfo["verifier_timeouts"],
        "verifier_errors": vinfo["verifier_errors"],
        "sample_entropy": float((host["entropy_BxN"] * mask_BxN).sum() / max(mask_BxN.sum(), 1)),
    }
    if with_ref:  # k3 KL(policy ‖ ref) on response tokens, from the rollout's own log-probs
      metrics["kl"] = float((np.asarray(k3_kl(old_logp, rows["ref_logp"])) * resp).sum() / max(resp.sum(), 1))
    timing = {"sample_s": t_sample - t0, "score_s": t_score - t_sample, "reward_s": t_reward - t_score,
              "tokens_per_s": float(np.sum(lengths)) / max(t_sample - t0, 1e-9), "width": P + n}
    return Experience(rows=rows, traces=traces, metrics=metrics, timing=timing)

  def _reward_columns(self, correct, sc_B, host, texts, key) -> list[np.ndarray]:
    """The reward signal(s) of `cfg.reward`, one float[B] column each (mix: verifier then self-certainty)."""
    G, kind = self.cfg.group_size, self.cfg.reward
    if kind == "verifier":
      return [correct]
    if kind == "self_certainty":
      return [sc_B]
    if kind == "mix":
      return [correct, sc_B]
    if kind == "entropy":
      return [rewards_lib.entropy_rewards(host["entropy_BxN"], host["mask_BxN"])]
    if kind == "majority":
      return [rewards_lib.majority_vote_rewards([extract_answer(t) for t in texts], G)]
    control_key = jax.random.fold_in(key, 0x5EED)  # not the sampler's stream
    if kind == "noise":
      return [rewards_lib.noise_rewards(control_key, len(texts))]
    if kind == "shuffled":
      return [rewards_lib.shuffle_within_groups(sc_B, G, control_key)]
    raise ValueError(f"RLConfig.reward={kind!r} is not handled by GroupCollector")

  def close(self) -> None:
    if self._own_pool:
      self.pool.close()
