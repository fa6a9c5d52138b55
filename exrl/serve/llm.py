"""One LLM interface over two backends: exrl's JAX sampler in-process, or any OpenAI-compatible endpoint.

  llm = LocalLLM(config, params, tokenizer)                     # exrl.rollout.sampler, this process
  llm = EndpointLLM("http://127.0.0.1:8000/v1", "Qwen/Qwen3-8B")  # vLLM, SGLang, exrl.serve, an API
  llm.chat([[{"role": "user", "content": "2+2?"}]], GenParams(n=4, temperature=0.7, seed=0))
  -> [[Completion, Completion, Completion, Completion]]          # per prompt, its n completions

Both take a batch of prompts (raw text for `complete`, message lists for `chat`) and return, per prompt, its
`n` completions. A prompt the backend refuses (too long for the model, a 4xx from the endpoint) comes back as
`n` completions with `finish_reason="error"` and the reason in `.error`, so one bad prompt never sinks a batch;
transport failures and 5xx are retried and then raised, since they say nothing about the prompt.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Protocol, Sequence

import jax
import numpy as np

from exrl.models.config import ModelConfig
from exrl.rollout.sampler import SamplingConfig, bucket_length, pad_prompts, sample
from exrl.train.evaluate import decode_completion


@dataclasses.dataclass(frozen=True)
class GenParams:
  """How to sample. temperature 0 is greedy. stop: strings that end a completion (cut before them)."""
  n: int = 1
  max_tokens: int = 64
  temperature: float = 1.0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple[str, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "stop", tuple(self.stop))
    if self.n < 1 or self.max_tokens < 1:
      raise ValueError(f"GenParams n={self.n} and max_tokens={self.max_tokens} must be >= 1")
    if self.temperature < 0:
      raise ValueError(f"GenParams temperature={self.temperature} must be >= 0 (0: greedy)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"GenParams top_p={self.top_p} must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class Completion:
  """One completion. token_ids: the sampled ids (empty when the backend does not return them).
  finish_reason: "stop" (a stop token or string), "length" (max_tokens) or "error" (see `error`)."""
  text: str
  prompt_tokens: int
  completion_tokens: int
  finish_reason: str
  token_ids: tuple[int, ...] = ()
  error: str | None = None


class LLM(Protocol):
  name: str

  def complete(self, prompts: Sequence[str], gen: GenParams) -> list[list[Completion]]: ...
  def chat(self, conversations: Sequence[Sequence[dict]], gen: GenParams) -> list[list[Completion]]: ...


def _error(n: int, why: str, prompt_tokens: int = 0) -> list[Completion]:
  return [Completion("", prompt_tokens, 0, "error", (), why) for _ in range(n)]


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  """text up to the earliest stop string (excluded), and whether one was found."""
  cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
  return (text[:min(cuts)], True) if cuts else (text, False)


class LocalLLM:
  """exrl's sampler over (config, params, tokenizer) in this process. Frozen: params are only read.

  A call samples its prompts in batches of up to `batch_size` (a smaller call: the next power of two, so small
  calls compile few shapes), prompt lengths bucketed by `prompt_bucket` (tokens, or "pow2"); batch i draws with
  fold_in(key(seed), i), so a call is deterministic in its prompts and `gen`. A lone prompt samples exactly as
  `sampler.sample(config, params, *pad_prompts([ids], pad, prompt_bucket), fold_in(key(seed), 0), sampling, n)`.
  """

  def __init__(self, config: ModelConfig, params, tokenizer, *, name: str = "exrl", batch_size: int = 64,
               prompt_bucket: int | str = 16):
    if batch_size < 1:
      raise ValueError(f"LocalLLM batch_size={batch_size} must be >= 1")
    self.config, self.params, self.tokenizer, self.name = config, params, tokenizer, name
    self.batch_size, self.prompt_bucket = batch_size, prompt_bucket
    self.use_template = bool(getattr(tokenizer, "has_chat_template", False))

  def sampling(self, gen: GenParams) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=gen.max_tokens, temperature=gen.temperature or 1.0, top_p=gen.top_p,
                          greedy=gen.temperature == 0, stop_token_ids=tuple(self.tokenizer.stop_ids),
                          pad_id=self.tokenizer.pad_id)

  def encode(self, text: str, *, templated: bool = False) -> list[int]:
    """Token ids of a prompt; bos unless a chat template (which holds its own) made the text."""
    return self.tokenizer.encode(text, add_bos=not templated and self.tokenizer.bos_id is not None)

  def chat_text(self, messages: Sequence[dict]) -> str:
    return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)

  def complete(self, prompts: Sequence[str], gen: GenParams) -> list[list[Completion]]:
    return self.generate([self.encode(p) for p in prompts], gen)

  def chat(self, conversations: Sequence[Sequence[dict]], gen: GenParams) -> list[list[Completion]]:
    return self.generate([self.encode(self.chat_text(c), templated=self.use_template) for c in conversations], gen)

  def generate(self, prompt_ids: Sequence[Sequence[int]], gen: GenParams) -> list[list[Completion]]:
    """Completions of token-id prompts; a prompt that cannot fit (or has bad ids) gets error completions."""
    limit, V = self.config.max_position_embeddings, self.config.vocab_size
    out: list[list[Completion] | None] = [None] * len(prompt_ids)
    ok = []
    for i, ids in enumerate(prompt_ids):
      if not ids:
        out[i] = _error(gen.n, "empty prompt: it has no tokens")
      elif len(ids) + gen.max_tokens > limit:
        out[i] = _error(gen.n, f"prompt of {len(ids)} tokens + max_tokens={gen.max_tokens} exceeds the model's "
                               f"{limit} positions", len(ids))
      elif min(ids) < 0 or max(ids) >= V:
        out[i] = _error(gen.n, f"prompt token ids must be in [0, {V})", len(ids))
      else:
        ok.append(i)
    sampling = self.sampling(gen)
    key = jax.random.key(gen.seed)
    batch = min(self.batch_size, bucket_length(max(len(ok), 1), "pow2"))
    for b, start in enumerate(range(0, len(ok), batch)):
      rows = ok[start:start + batch]
      chunk = [prompt_ids[i] for i in rows]
      chunk += [chunk[-1]] * (batch - len(chunk))  # fixed batch shape: one compile per bucket
      tokens, valid = pad_prompts(chunk, self.tokenizer.pad_id, self.prompt_bucket)
      res = sample(self.config, self.params, tokens, valid, jax.random.fold_in(key, b), sampling, gen.n)
      toks, mask = jax.device_get((res.tokens_BxN, res.mask_BxN))
      stops = set(sampling.stop_token_ids)
      for r, i in enumerate(rows):
        comps = []
        for j in range(gen.n):
          ids = np.asarray(toks[r * gen.n + j])[np.asarray(mask[r * gen.n + j])].tolist()
          text, cut = cut_at_stop(decode_completion(self.tokenizer, ids), gen.stop)
          stopped = cut or (bool(ids) and ids[-1] in stops)
          comps.append(Completion(text, len(prompt_ids[i]), len(ids), "stop" if stopped else "length", tuple(ids)))
        out[i] = comps
    return out  # type: ignore[return-value]


class EndpointError(RuntimeError):
  """The endpoint could not be reached, or kept failing, after the retries."""


class EndpointLLM:
  """An OpenAI-compatible server (`base_url` as the openai client takes it, e.g. http://127.0.0.1:8000/v1).

  Each prompt is one request (n completions), sent `concurrency` at a time, with `timeout_s` per request.
  Connection errors, timeouts, 429 and 5xx are retried `retries` times with exponential backoff, then raise
  `EndpointError`; any other 4xx becomes that prompt's error completions. The API key, if any, is read from
  the environment variable named by `api_key_env`.
  """

  def __init__(self, base_url: str, model: str, *, timeout_s: float = 300.0, retries: int = 4,
               backoff_s: float = 1.0, concurrency: int = 16, api_key_env: str = "OPENAI_API_KEY", http=None):
    import httpx  # only the endpoint backend needs it

    if not base_url.startswith(("http://", "https://")):
      raise ValueError(f"endpoint {base_url!r} must be an http(s) URL such as http://127.0.0.1:8000/v1")
    if not model:
      raise ValueError(f"endpoint {base_url}: name the model to request (as the server lists it at /models)")
    self.base, self.name = base_url.rstrip("/"), model
    self.retries, self.backoff_s, self.concurrency = retries, backoff_s, max(1, concurrency)
    key = os.environ.get(api_key_env, "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    self._httpx = httpx
    self.http = http or httpx.Client(timeout=timeout_s, headers=headers,
                                     limits=httpx.Limits(max_connections=self.concurrency,
                                                         max_keepalive_connections=self.concurrency))

  def close(self) -> None:
    self.http.close()

  def _post(self, route: str, body: dict) -> dict | str:
    """The reply JSON, or a 4xx's detail as a string (the prompt's error)."""
    err: object = None
    for attempt in range(self.retries + 1):
      try:
        r = self.http.post(self.base + route, json=body)
      except self._httpx.TransportError as e:  # connect / read errors and timeouts: generation is idempotent
        err = e
      else:
        if r.status_code < 400:
          return r.json()
        if r.status_code != 429 and r.status_code < 500:
          return f"HTTP {r.status_code}: {r.text[:500]}"
        err = f"HTTP {r.status_code}: {r.text[:200]}"
      if attempt < self.retries:
        time.sleep(self.backoff_s * 2 ** attempt)
    raise EndpointError(f"POST {self.base + route} failed after {self.retries + 1} attempts: {err}")

  def _one(self, route: str, body: dict, gen: GenParams, chat: bool) -> list[Completion]:
    body = {**body, "model": self.name, "n": gen.n, "max_tokens": gen.max_tokens, "temperature": gen.temperature,
            "top_p": gen.top_p, "seed": gen.seed, **({"stop": list(gen.stop)} if gen.stop else {})}
    reply = self._post(route, body)
    if isinstance(reply, str):
      return _error(gen.n, reply)
    usage = reply.get("usage") or {}
    choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
    per = int(usage.get("completion_tokens", 0)) // max(len(choices), 1)  # usage is per request, not per choice
    out = []
    for c in choices[:gen.n]:
      text = ((c.get("message") or {}).get("content") if chat else c.get("text")) or ""
      ids = tuple(c.get("token_ids") or ())
      out.append(Completion(text, int(usage.get("prompt_tokens", 0)), len(ids) or per,
                            c.get("finish_reason") or "stop", ids))
    return out + _error(gen.n - len(out), f"endpoint returned {len(out)} of {gen.n} choices")

  def _many(self, route: str, bodies: list[dict], gen: GenParams, chat: bool) -> list[list[Completion]]:
    # Prompt i asks with seed + i, so the prompts of one call are not sampled with the same noise.
    gens = [dataclasses.replace(gen, seed=gen.seed + i) for i in range(len(bodies))]
    with concurrent.futures.ThreadPoolExecutor(self.concurrency) as ex:
      return list(ex.map(lambda a: self._one(route, a[0], a[1], chat), zip(bodies, gens)))

  def complete(self, prompts: Sequence[str], gen: GenParams) -> list[list[Completion]]:
    return self._many("/completions", [{"prompt": p} for p in prompts], gen, chat=False)

  def chat(self, conversations: Sequence[Sequence[dict]], gen: GenParams) -> list[list[Completion]]:
    return self._many("/chat/completions", [{"messages": list(c)} for c in conversations], gen, chat=True)
