"""Evaluation: pass@1 at a sampling temperature and greedy accuracy, with 95% Wilson intervals.

Responses are scored through the time-bounded verifier pool (`exrl.tasks.pool`), as in training: a
hung or crashing verifier scores 0 and is counted in the result (`verifier_timeouts`, `verifier_errors`).
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable, Sequence

import jax
import numpy as np

from exrl.models.config import ModelConfig
from exrl.rollout.markov import MarkovConfig, markov_sample, response_tokens
from exrl.rollout.engine import generate
from exrl.rollout.sampler import SamplingConfig, bucket_length, pad_prompts, with_interrupt_tokens
from exrl.tasks import pool as pool_lib


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
  """95% Wilson score interval for a binomial proportion (well-behaved near 0 and 1)."""
  if n == 0:
    return (0.0, 1.0)
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return (max(0.0, centre - half), min(1.0, centre + half))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """batch_size is the largest batch; fewer problems run in a batch of the next power of two that holds them."""
  batch_size: int = 128
  sampling: SamplingConfig = SamplingConfig(max_new_tokens=32, temperature=1.0)
  samples_per_problem: int = 1  # pass@1 is averaged over these samples
  greedy: bool = True  # also report greedy accuracy
  seed: int = 1234

  def __post_init__(self):
    if self.batch_size < 1 or self.samples_per_problem < 1:
      raise ValueError(f"EvalConfig.batch_size={self.batch_size} and samples_per_problem={self.samples_per_problem} "
                       f"must be >= 1")


def decode_completion(tokenizer, ids) -> str:
  """Decode sampled ids, dropping any past the tokenizer's vocab (a model's padded vocab rows).

  Model output is untrusted: a model whose embedding is padded beyond the tokenizer (Qwen's is, and
  so is exrl's tiny model) can sample those rows, and the text must still decode.
  """
  n = tokenizer.vocab_size
  return tokenizer.decode([int(i) for i in ids if 0 <= int(i) < n])


def generate_texts(config: ModelConfig, params, tokenizer, prompts: Sequence[str], sampling: SamplingConfig,
                   key: jax.Array, batch_size: int, encode: Callable[[str], list[int]] | None = None,
                   markov: MarkovConfig | None = None) -> tuple[list[str], np.ndarray]:
  """Decoded completions and their lengths in tokens, batched (the last batch padded with repeats).

  markov: think in Delethink chunks (`exrl.rollout.markov`) instead of one context of max_new_tokens.
  """
  encode = encode or (lambda s: tokenizer.encode(s, add_bos=True))
  batch_size = min(batch_size, bucket_length(len(prompts), "pow2"))  # a few problems never fill a big batch
  texts, lengths = [], []
  for i, start in enumerate(range(0, len(prompts), batch_size)):
    chunk = list(prompts[start:start + batch_size])
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n)  # fixed batch shape: one compile
    tokens, valid = pad_prompts([encode(p) for p in chunk], tokenizer.pad_id)
    if markov is None:
      out = generate(config, params, tokens, valid, jax.random.fold_in(key, i), sampling)
      # The generated tokens, injected length-interruption text included (mask_BxN drops it: it carries no loss).
      toks, mask = jax.device_get((out.tokens_BxN, out.seq_valid_BxS[:, tokens.shape[1]:]))
      responses = [toks[row][mask[row]].tolist() for row in range(n)]
    else:
      responses = response_tokens(markov_sample(config, params, tokens, valid, jax.random.fold_in(key, i), sampling,
                                                markov))[:n]
    for ids in responses:
      texts.append(decode_completion(tokenizer, ids))
      lengths.append(len(ids))
  return texts, np.asarray(lengths)


def evaluate(config: ModelConfig, params, tokenizer, problems, verify: Callable | None, cfg: EvalConfig = EvalConfig(),
             encode=None, *, pool: pool_lib.VerifierPool | None = None, markov: MarkovConfig | None = None) -> dict:
  """pass@1 (at `cfg.sampling`) and greedy accuracy over `problems`, with 95% CIs.

  markov: generate with Delethink chunks (its budget replaces `cfg.sampling.max_new_tokens`).
  verify: a picklable `(text, problem) -> float`, or None for each problem's task verifier; calls run in
  `pool` (default: the process-wide `default_pool()`).
  """
  prompts = [p.prompt for p in problems]
  result = {"n": len(problems), "verifier_timeouts": 0, "verifier_errors": 0}
  key = jax.random.key(cfg.seed)
  sampled = dataclasses.replace(cfg.sampling, stop_token_ids=cfg.sampling.stop_token_ids or tuple(tokenizer.stop_ids),
                                pad_id=tokenizer.pad_id)
  sampled = with_interrupt_tokens(sampled, tokenizer.encode)

  def score(texts):
    s, info = pool_lib.verifier_rewards(texts, problems, verify, pool=pool)
    result["verifier_timeouts"] += info["verifier_timeouts"]
    result["verifier_errors"] += info["verifier_errors"]
    return np.asarray(s, np.float64)

  scores, lens = [], []
  for s in range(cfg.samples_per_problem):
    texts, lengths = generate_texts(config, params, tokenizer, prompts, sampled, jax.random.fold_in(key, s),
                                    cfg.batch_size, encode, markov)
    scores.append(score(texts))
    lens.append(lengths)
  per_problem = np.mean(np.asarray(scores, np.float64), axis=0)
  n_total = len(problems) * cfg.samples_per_problem
  result.update(pass1=float(per_problem.mean()),
                pass1_ci95=list(wilson_interval(float(np.sum(scores)), n_total)),
                mean_len=float(np.mean(lens)), samples_per_problem=cfg.samples_per_problem)
  if cfg.greedy:
    greedy = dataclasses.replace(sampled, greedy=True)
    texts, lengths = generate_texts(config, params, tokenizer, prompts, greedy, key, cfg.batch_size, encode, markov)
    g = score(texts)
    result.update(greedy=float(g.mean()), greedy_ci95=list(wilson_interval(float(g.sum()), len(problems))),
                  greedy_len=float(np.mean(lengths)), greedy_examples=texts[:3])
  return result


def answer_probe(config: ModelConfig, params, tokenizer, problems, extract: Callable[[str], str | None],
                 sampling: SamplingConfig, samples: int = 8, seed: int = 0, batch_size: int = 128) -> dict:
  """What a policy answers, and how sure it is: `samples` completions per problem at `sampling`.

  Returns distinct_per_problem (mean number of distinct extracted answers among a problem's samples),
  distinct_overall (over all samples), top3_share (fraction of samples whose answer is one of the 3 most common
  overall; near 1 when the policy answers a few fixed numbers whatever the prompt), no_answer (fraction with
  none), and self_certainty / entropy: nats per sampled token at the sampling temperature, averaged per sample.
  """
  sampled = dataclasses.replace(sampling, stop_token_ids=sampling.stop_token_ids or tuple(tokenizer.stop_ids),
                                pad_id=tokenizer.pad_id)
  sampled = with_interrupt_tokens(sampled, tokenizer.encode)
  prompts = [p.prompt for p in problems for _ in range(samples)]
  batch_size = min(batch_size, bucket_length(len(prompts), "pow2"))
  answers, sc, ent = [], [], []
  for i, start in enumerate(range(0, len(prompts), batch_size)):
    chunk = prompts[start:start + batch_size]
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n)
    tokens, valid = pad_prompts([tokenizer.encode(p, add_bos=True) for p in chunk], tokenizer.pad_id)
    out = generate(config, params, tokens, valid, jax.random.fold_in(jax.random.key(seed), i), sampled)
    toks, mask, sc_BxN, ent_BxN = jax.device_get((out.tokens_BxN, out.mask_BxN, out.self_certainty_BxN,
                                                 out.entropy_BxN))
    per_token = lambda x_BxN: (x_BxN * mask).sum(1) / np.maximum(mask.sum(1), 1)
    answers += [extract(decode_completion(tokenizer, toks[r][mask[r]])) for r in range(n)]
    sc += per_token(sc_BxN)[:n].tolist()
    ent += per_token(ent_BxN)[:n].tolist()
  return {"problems": len(problems), "samples": samples, **answer_stats(answers, samples),
          "self_certainty": float(np.mean(sc)), "entropy": float(np.mean(ent))}


def answer_stats(answers: Sequence[str | None], samples: int) -> dict:
  """Diversity of extracted answers, `samples` consecutive ones per problem (None: no answer); see `answer_probe`."""
  counts = collections.Counter(a for a in answers if a is not None)
  groups = [answers[i:i + samples] for i in range(0, len(answers), samples)]
  return {"distinct_per_problem": float(np.mean([len({a for a in g if a is not None}) for g in groups])),
          "distinct_overall": len(counts),
          "top3_share": sum(c for _, c in counts.most_common(3)) / len(answers),
          "top3": [a for a, _ in counts.most_common(3)],
          "no_answer": sum(a is None for a in answers) / len(answers)}
