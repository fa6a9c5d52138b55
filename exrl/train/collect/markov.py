"""Delethink group rollouts: RL over Markovian chunks (arXiv 2510.06557), a `Collector` for `train_rl`.

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

import time
from typing import Callable, Sequence

import jax
import numpy as np

from exrl.models.config import ModelConfig
from exrl.rl import rewards as rewards_lib
from exrl.rollout.markov import MarkovConfig, markov_sample
from exrl.rollout.sampler import bucket_length, pad_prompts
from exrl.tasks import pool as pool_lib
from exrl.tasks.math_data import extract_answer
from exrl.train.collect import core
from exrl.train.evaluate import decode_completion
from exrl.train.experience import Experience, score


class MarkovCollector(core.CollectorBase):
  """`collect(params, ref_params, problems, key) -> Experience` with one row per Delethink chunk.

  cfg: an `RLConfig`; every field but the engine's is honoured, every registered reward included. `sampling.max_new_tokens` may only
    be left at its default or equal `markov.budget`: the chunking sets the budget. markov: the chunking. With one inner epoch, old log-probs are the sampler's (at the
    sampling temperature); otherwise every chunk row is re-scored.
  """

  provides = rewards_lib.INPUTS
  unsupported = {"sampling.engine": "Delethink chunks run in exrl.rollout.markov's own chunk loop (static batches)",
                 "sampling.slots": "Delethink chunks run in exrl.rollout.markov's own chunk loop (static batches)",
                 **{f: "the chunking bounds the thinking (MarkovConfig)" for f in core.INTERRUPTION}}

  def __init__(self, cfg, markov: MarkovConfig, model_config: ModelConfig, tokenizer, *,
               verify: Callable | None = None, encode: Callable | None = None,
               pool: pool_lib.VerifierPool | None = None):
    core.single_process_only(type(self).__name__)
    n, default = cfg.sampling.max_new_tokens, type(cfg)().sampling.max_new_tokens
    if n not in (default, markov.budget):
      raise ValueError(f"MarkovCollector does not support RLConfig.sampling.max_new_tokens={n} (leave it at {default} "
                       f"or set it to the chunking's budget {markov.budget}): the chunking sets the budget")
    super().__init__(cfg, model_config, tokenizer, verify=verify, encode=encode, pool=pool)
    self.markov = markov

  def collect(self, params, ref_params, problems: Sequence, key: jax.Array) -> Experience:
    cfg, G = self.cfg, self.cfg.group_size
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
    scored = {}
    if with_policy or self.with_ref:
      scored = jax.device_get(score(self.model_config, params, ref_params, rows["tokens"], rows["valid"],
                                    rows["positions"], response, with_ref=self.with_ref, with_policy=with_policy,
                                    temperature=self.temperature, pack_width=cfg.pack_width))
    t_score = time.perf_counter()

    mask_BxIxS = host["response_BxIxS"]
    count_B = np.maximum(mask_BxIxS.sum((1, 2)), 1)
    sc_B = (host["self_certainty_BxIxS"] * mask_BxIxS).sum((1, 2)) / count_B
    if cfg.sc_annotator == "offline":  # the reference's per-chunk means, weighted by each chunk's response tokens
      sc_B = np.bincount(trace_R, (scored["ref_sc_B"] * response.sum(1))[:R], minlength=B) / count_B
    texts = [decode_completion(self.tokenizer, t[m].tolist()) for t, m in zip(host["tokens_BxIxS"], mask_BxIxS)]
    correct, vinfo = pool_lib.verifier_rewards(texts, rollout_problems, self.verify, pool=self.pool)
    t_reward = time.perf_counter()

    old_logp = scored["logp"] if with_policy else sampler_logp
    ref_logp = scored["ref_logp"] if self.with_ref else old_logp
    kl_R = core.kl_sum(old_logp, ref_logp, response)[:R] if self.with_ref else None
    inputs = rewards_lib.RewardInputs(
        group_size=G, key=key, outcome_B=np.asarray(correct), self_certainty_B=sc_B,
        entropy_BxN=host["entropy_BxIxS"].reshape(B, -1), mask_BxN=mask_BxIxS.reshape(B, -1),
        answers=[extract_answer(t) for t in texts] if cfg.reward == "majority" else None)
    stats = core.TraceStats(
        correct_B=np.asarray(correct), response_B=mask_BxIxS.sum((1, 2)), outcome_B=np.asarray(correct),
        self_certainty_B=sc_B, entropy_sum_B=core.token_sum(host["entropy_BxIxS"], mask_BxIxS),
        kl_sum_B=np.bincount(trace_R, kl_R, minlength=B) if self.with_ref else None,
        extra_B={"chunks_mean": n_B, "stopped_frac": host["stopped_B"]},
        counts={k: vinfo[k] for k in ("verifier_timeouts", "verifier_errors")})
    reward_B, adv_B, keep_B, metrics = core.rewards_and_advantages(cfg, inputs, stats)

    pad_ids = np.arange(R_pad - R)
    rows.update(
        loss_mask=response.astype(np.float32) * _pad_rows(keep_B[trace_R], R_pad)[:, None],
        old_logp=old_logp, ref_logp=ref_logp, adv=_pad_rows(adv_B[trace_R], R_pad),
        trace_id=np.concatenate([trace_R, B + pad_ids]).astype(np.int32),
        group_id=np.concatenate([trace_R // G, B // G + pad_ids]).astype(np.int32))
    lengths = host["lengths_B"]
    traces = {"problem": np.arange(B) // G, "text": texts, "reward": reward_B, "length": lengths,
              "correct": np.asarray(correct), "self_certainty": sc_B, "chunks": n_B, "stopped": host["stopped_B"]}
    timing = {"sample_s": t_sample - t0, "score_s": t_score - t_sample, "reward_s": t_reward - t_score,
              "tokens_per_s": float(lengths.sum()) / max(t_sample - t0, 1e-9), "rows": R_pad}
    return Experience(rows=rows, traces=traces, metrics=metrics, timing=timing)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """x with zero rows appended up to `rows` (empty rows: invalid, no loss)."""
  return np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])
