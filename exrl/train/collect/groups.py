"""Single-turn group rollouts (GRPO / Intuitor): the first `Collector` of the RL loop's `collect` seam.

Each problem is sampled `group_size` times; rows are prompt + completion. The reward is any entry of the registry
`exrl.rl.rewards.REWARDS`: the verifier's (time-bounded worker processes), self-certainty (Intuitor: no labels), both
normalised per group and mixed, another label-free reward (RENT, TTRL), or a control. Accuracy is always measured by
the verifier, whatever the reward.
"""
from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from exrl.infra import distributed
from exrl.rl import rewards as rewards_lib
from exrl.rollout import versioned
from exrl.rollout.engine import generate, generate_versioned
from exrl.rollout.sampler import bucket_length, pad_prompts
from exrl.tasks import pool as pool_lib
from exrl.tasks.math_data import extract_answer
from exrl.train.collect import core
from exrl.train.evaluate import decode_completion
from exrl.train.experience import Experience, score


TRIM_BUCKET = 16  # completions are trimmed to the longest sampled one, rounded up to this: few compiled widths


class GroupCollector(core.CollectorBase):
  """`collect(params, ref_params, problems, key) -> Experience` for one prompt + one completion per row.

  cfg: an `RLConfig`; every field is honoured. With one inner epoch the policy is not re-scored: old log-probs and
  self-certainty come from the sampler, at the sampling temperature. verify: picklable `(text, problem) -> float`;
  None looks the verifier up by `problem.task`. encode: prompt text -> ids (default: tokenizer with bos).
  """

  provides = rewards_lib.INPUTS
  takes_feed = True  # collect() accepts a versioned.Feed as params: in-flight weight switches (async_loop)

  def collect(self, params, ref_params, problems: Sequence, key: jax.Array) -> Experience:
    cfg, G = self.cfg, self.cfg.group_size
    t0 = time.perf_counter()
    rollout_problems = [p for p in problems for _ in range(G)]
    # Each prompt is prefilled once and sampled G times (rows of a group adjacent, as in rollout_problems).
    tokens_UxP, valid_UxP = pad_prompts([self.encode(p.prompt) for p in problems], self.tokenizer.pad_id)
    # Several processes: each brings its own prompts to one global batch (padded to a common width), the sampler
    # runs over the whole mesh, and each process reads back only its own rows.
    mesh = core.params_mesh(params) if jax.process_count() > 1 else None
    to_host = (lambda tree: distributed.local_rows(tree, mesh)) if mesh else jax.device_get
    prompts = (tokens_UxP, valid_UxP)
    if mesh:
      pad = ((0, 0), (distributed.agree_max(tokens_UxP.shape[1]) - tokens_UxP.shape[1], 0))
      tokens_UxP, valid_UxP = np.pad(tokens_UxP, pad, constant_values=self.tokenizer.pad_id), np.pad(valid_UxP, pad)
      prompts = (distributed.global_rows(tokens_UxP, mesh), distributed.global_rows(valid_UxP, mesh))
    version_BxN = None
    if isinstance(params, versioned.Feed):  # a rollout worker's in-flight weights (exrl.train.async_loop)
      if cfg.inner_epochs > 1:
        raise ValueError(f"in-flight weight switches need inner_epochs=1 (got {cfg.inner_epochs}): the sampler's "
                         f"per-token log-probs are the behaviour policy's")
      out, version_BxN = generate_versioned(self.model_config, params, *prompts, key, self.sampling, num_samples=G,
                                            every=params.every)
      params = params.first[1]  # unused past sampling with one inner epoch; a tree, not the feed, for `score`
    else:
      out = generate(self.model_config, params, *prompts, key, self.sampling, num_samples=G)  # static | continuous
    lengths = np.asarray(to_host(out.lengths_B))  # waits for the sampler: sample_s is real
    t_sample = time.perf_counter()
    # Trim to the longest completion, bucketed, so the update never pays for unused max_new_tokens.
    P, N = tokens_UxP.shape[1], self.sampling.max_new_tokens
    n = min(N, bucket_length(max(distributed.agree_max(int(lengths.max())), 1), TRIM_BUCKET))
    seq = {"tokens": out.seq_tokens_BxS[:, :P + n], "valid": out.seq_valid_BxS[:, :P + n],
           "positions": out.seq_positions_BxS[:, :P + n]}
    response = jnp.concatenate([jnp.zeros_like(out.seq_valid_BxS[:, :P]), out.mask_BxN[:, :n]], axis=1)
    # One policy pass only when the old log-probs must outlive an update (several inner epochs); else the
    # sampler's statistics serve.
    with_policy = cfg.inner_epochs > 1
    scored = {}
    if with_policy or self.with_ref:
      scored = score(self.model_config, params, ref_params, seq["tokens"], seq["valid"], seq["positions"], response,
                     with_ref=self.with_ref, with_policy=with_policy, temperature=self.temperature,
                     pack_width=0 if mesh else cfg.pack_width)  # packing reads every row: one process only
    host = to_host({**seq, **scored, "response": response, "tokens_BxN": out.tokens_BxN[:, :n],
                           "mask_BxN": out.mask_BxN[:, :n], "logp_BxN": out.logp_BxN[:, :n],
                           "sc_BxN": out.self_certainty_BxN[:, :n], "entropy_BxN": out.entropy_BxN[:, :n]})
    t_score = time.perf_counter()
    mask_BxN = host["mask_BxN"]
    sampler_sc_B = (host["sc_BxN"] * mask_BxN).sum(1) / np.maximum(mask_BxN.sum(1), 1)
    sc_B = host["ref_sc_B"] if cfg.sc_annotator == "offline" else host.get("sc_B", sampler_sc_B)
    # The text holds every completion token, injected length-interruption text included (it carries no loss).
    gen_BxN = host["valid"][:, P:]
    texts = [decode_completion(self.tokenizer, t[m].tolist()) for t, m in zip(host["tokens_BxN"], gen_BxN)]
    correct, vinfo = pool_lib.verifier_rewards(texts, rollout_problems, self.verify, pool=self.pool)
    t_reward = time.perf_counter()

    resp = np.asarray(host["response"], np.float32)
    old_logp = host["logp"] if with_policy else np.pad(host["logp_BxN"], ((0, 0), (P, 0)))
    ref_logp = host["ref_logp"] if self.with_ref else old_logp
    inputs = rewards_lib.RewardInputs(
        group_size=G, key=key, outcome_B=np.asarray(correct), self_certainty_B=np.asarray(sc_B),
        entropy_BxN=host["entropy_BxN"], mask_BxN=mask_BxN,
        answers=[extract_answer(t) for t in texts] if cfg.reward == "majority" else None)
    stats = core.TraceStats(
        correct_B=np.asarray(correct), response_B=mask_BxN.sum(1), outcome_B=np.asarray(correct),
        self_certainty_B=np.asarray(sc_B), entropy_sum_B=core.token_sum(host["entropy_BxN"], mask_BxN),
        kl_sum_B=core.kl_sum(old_logp, ref_logp, resp) if self.with_ref else None,
        counts={k: vinfo[k] for k in ("verifier_timeouts", "verifier_errors")})
    total_B, adv_B, keep_B, metrics = core.rewards_and_advantages(cfg, inputs, stats)
    B = len(rollout_problems)
    rows = {"tokens": host["tokens"], "valid": host["valid"], "positions": host["positions"],
            "loss_mask": resp * keep_B[:, None], "old_logp": old_logp, "ref_logp": ref_logp, "adv": adv_B,
            "trace_id": np.arange(B, dtype=np.int32), "group_id": (np.arange(B) // G).astype(np.int32)}
    traces = {"problem": np.arange(B) // G, "text": texts, "reward": total_B, "length": lengths,
              "correct": np.asarray(correct), "self_certainty": np.asarray(sc_B)}
    if version_BxN is not None:
      traces["version"] = version_BxN[:, :n]  # each completion token's policy version (-1: none)
    timing = {"sample_s": t_sample - t0, "score_s": t_score - t_sample, "reward_s": t_reward - t_score,
              "tokens_per_s": float(np.sum(lengths)) / max(t_sample - t0, 1e-9), "width": P + n}
    return Experience(rows=rows, traces=traces, metrics=metrics, timing=timing)
