"""Delethink group rollouts: RL over Markovian chunks (RESEARCH.md §3), a `Collector` for `train_rl`.

Each problem is sampled `group_size` times with `exrl.rollout.markov` (chunks of C tokens, carryover m).
The reward is computed on the final answer of the whole trace; every chunk of a trace becomes one training
row of width P + C (its query ⊕ carryover context and the tokens it generated) and carries the trace's
advantage. With `LossConfig(aggregation="seq_mean_token_mean")` the loss of a trace is normalised by its
response tokens summed over all its chunks, then averaged over traces, as the paper does; the rows of a
trace share a `trace_id` so this holds however the rows are packed.

The number of chunk rows varies per step, so rows are padded (empty rows: no loss) to a multiple of the
number of traces: the train step compiles for at most `max_chunks` row counts, never per trace length.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np

from exrl.models.config import ModelConfig
from exrl.rl.advantages import compute_advantages
from exrl.rl.losses import k3_kl
from exrl.rollout.markov import MarkovConfig, markov_sample
from exrl.rollout.sampler import bucket_length, pad_prompts
from exrl.tasks import pool as pool_lib
from exrl.train.evaluate import decode_completion
from exrl.train.experience import Experience, score

REWARDS = ("verifier", "self_certainty")


class MarkovCollector:
  """`collect(params, ref_params, problems, key) -> Experience` with one row per Delethink chunk.

  cfg: an `RLConfig` (group_size, reward in {verifier, self_certainty}, sampling, advantage, inner_epochs,
    kl_monitor, loss.kl_beta, verifier_timeout_s, pack_width). markov: the chunking. With one inner epoch, old log-probs
    are the sampler's (at the sampling temperature); otherwise every chunk row is re-scored.
  """

  def __init__(self, cfg, markov: MarkovConfig, model_config: ModelConfig, tokenizer, *,
               verify: Callable | None = None, encode: Callable | None = None,
               pool: pool_lib.VerifierPool | None = None):
    if cfg.reward not in REWARDS:
      raise ValueError(f"RLConfig.reward={cfg.reward!r} is not supported by MarkovCollector; valid: {REWARDS}")
    self.cfg, self.markov, self.model_config, self.tokenizer, self.verify = cfg, markov, model_config, tokenizer, verify
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
    B = len(rollout_problems)
    tokens, valid = pad_prompts([self.encode(p.prompt) for p in rollout_problems], self.tokenizer.pad_id)
    out = markov_sample(self.model_config, params, tokens, valid, key, self.sampling, self.markov)
    host = jax.device_get(out._asdict())  # one round trip: every chunk row and statistic
    t_sample = time.perf_counter()

    # Chunk rows in trace order (groups stay contiguous), padded with empty rows to a multiple of B.
    n_B = host["num_chunks_B"]
    trace_R = np.repeat(np.arange(B), n_B)
    chunk_R = np.concatenate([np.arange(n) for n in n_B])
    R, R_pad = len(trace_R), bucket_length(len(trace_R), B)
    take = lambda x: _pad_rows(x[trace_R, chunk_R], R_pad)
    rows = {k: take(host[f"{k}_BxIxS"]) for k in ("tokens", "valid", "positions")}
    response = take(host["response_BxIxS"])
    sampler_logp = take(host["logp_BxIxS"])
    with_policy = cfg.inner_epochs > 1
    with_ref = (cfg.loss.kl_beta > 0 and cfg.loss.kl_estimator == "k3") or cfg.kl_monitor
    scored = {}
    if with_policy or with_ref:
      scored = jax.device_get(score(self.model_config, params, ref_params, rows["tokens"], rows["valid"],
                                    rows["positions"], response, with_ref=with_ref, with_policy=with_policy,
                                    temperature=T, pack_width=cfg.pack_width))
    t_score = time.perf_counter()

    mask_BxIxS = host["response_BxIxS"]
    count_B = np.maximum(mask_BxIxS.sum((1, 2)), 1)
    sc_B = (host["self_certainty_BxIxS"] * mask_BxIxS).sum((1, 2)) / count_B
    texts = [decode_completion(self.tokenizer, t[m].tolist()) for t, m in zip(host["tokens_BxIxS"], mask_BxIxS)]
    correct, vinfo = pool_lib.verifier_rewards(texts, rollout_problems, self.verify, pool=self.pool)
    t_reward = time.perf_counter()
    reward_B = np.asarray(correct if cfg.reward == "verifier" else sc_B, np.float32)
    adv_B, keep_B = jax.device_get(compute_advantages(reward_B[:, None], cfg.advantage, G))
    adv_B, keep_B = np.asarray(adv_B, np.float32), np.asarray(keep_B, np.float32)

    pad_ids = np.arange(R_pad - R)
    old_logp = scored["logp"] if with_policy else sampler_logp
    rows.update(
        loss_mask=response.astype(np.float32) * _pad_rows(keep_B[trace_R], R_pad)[:, None],
        old_logp=old_logp, ref_logp=scored["ref_logp"] if with_ref else old_logp,
        adv=_pad_rows(adv_B[trace_R], R_pad),
        trace_id=np.concatenate([trace_R, B + pad_ids]).astype(np.int32),
        group_id=np.concatenate([trace_R // G, B // G + pad_ids]).astype(np.int32))
    lengths = host["lengths_B"]
    traces = {"problem": np.arange(B) // G, "text": texts, "reward": reward_B, "length": lengths,
              "correct": np.asarray(correct), "self_certainty": sc_B, "chunks": n_B, "stopped": host["stopped_B"]}
    metrics = {
        "reward_mean": float(reward_B.mean()), "reward_std": float(reward_B.std()),
        "accuracy": float(np.mean(correct)), "self_certainty_reward": float(sc_B.mean()),
        "response_len": float(lengths.mean()), "chunks_mean": float(n_B.mean()),
        "stopped_frac": float(host["stopped_B"].mean()), "zero_var_frac": float(1 - keep_B.mean()),
        "verifier_timeouts": vinfo["verifier_timeouts"], "verifier_errors": vinfo["verifier_errors"],
        "sample_entropy": float((host["entropy_BxIxS"] * mask_BxIxS).sum() / max(mask_BxIxS.sum(), 1)),
    }
    if with_ref:
      resp = response.astype(np.float32)
      metrics["kl"] = float((np.asarray(k3_kl(old_logp, rows["ref_logp"])) * resp).sum() / max(resp.sum(), 1))
    timing = {"sample_s": t_sample - t0, "score_s": t_score - t_sample, "reward_s": t_reward - t_score,
              "tokens_per_s": float(lengths.sum()) / max(t_sample - t0, 1e-9), "rows": R_pad}
    return Experience(rows=rows, traces=traces, metrics=metrics, timing=timing)

  def close(self) -> None:
    if self._own_pool:
      self.pool.close()


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """x with zero rows appended up to `rows` (empty rows: invalid, no loss)."""
  return np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])
