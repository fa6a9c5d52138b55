"""`python -m exrl.serve`: the official openai client gets the in-process sampler's tokens; bad requests get 4xx."""
from __future__ import annotations

import httpx
import jax
import numpy as np
import openai
import pytest

from exrl.envs.server import running_server
from exrl.models import hf
from exrl.rollout.sampler import SamplingConfig, pad_prompts, sample
from exrl.tokenizer import load_tokenizer
from tests.serve.tiny_model import make_tiny_model_dir

NAME = "tiny"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """(base URL, model dir) of `python -m exrl.serve` on a free loopback port, stopped after the module."""
  model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("serve") / "model")
  with running_server("--model", str(model_dir), "--served-model-name", NAME, timeout_s=120,
                      module="exrl.serve") as url:
    yield url, model_dir


def _oracle(model_dir, prompt_ids, seed, n, sampling_kw):
  """The completions `sampler.sample` draws in this process, as lists of ids."""
  config, params = hf.load(model_dir)
  tok = load_tokenizer(model_dir)
  sampling = SamplingConfig(stop_token_ids=tok.stop_ids, pad_id=tok.pad_id, **sampling_kw)
  tokens, valid = pad_prompts([prompt_ids], tok.pad_id, 16)
  out = sample(config, params, tokens, valid, jax.random.fold_in(jax.random.key(seed), 0), sampling, n)
  toks, mask = jax.device_get((out.tokens_BxN, out.mask_BxN))
  return [np.asarray(t)[np.asarray(m)].tolist() for t, m in zip(toks, mask)], tok


def test_completions_match_in_process_sampler(served):
  url, model_dir = served
  client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
  assert [m.id for m in client.models.list().data] == [NAME]
  r = client.completions.create(model=NAME, prompt="12+34=", max_tokens=12, n=3, seed=7, temperature=1.0)
  tok = load_tokenizer(model_dir)
  want, tok = _oracle(model_dir, tok.encode("12+34=", add_bos=True), 7, 3,
                      {"max_new_tokens": 12, "temperature": 1.0})
  got = [c.token_ids for c in sorted(r.choices, key=lambda c: c.index)]
  assert got == want
  assert len({tuple(x) for x in want}) > 1  # three different samples: n draws, not one repeated
  assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [tok.decode(x) for x in want]
  assert r.usage.completion_tokens == sum(len(x) for x in want)
  again = client.completions.create(model=NAME, prompt="12+34=", max_tokens=12, n=3, seed=7, temperature=1.0)
  assert [c.token_ids for c in sorted(again.choices, key=lambda c: c.index)] == want


def test_chat_matches_in_process_sampler(served):
  url, model_dir = served
  client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
  messages = [{"role": "system", "content": "score 1 correct"}, {"role": "user", "content": "7+8="}]
  r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, seed=3, temperature=0.7)
  tok = load_tokenizer(model_dir)
  text = "system: score 1 correct\nuser: 7+8=\nassistant: "  # the plain template, written out independently
  want, _ = _oracle(model_dir, tok.encode(text, add_bos=True), 3, 1, {"max_new_tokens": 10, "temperature": 0.7})
  assert r.choices[0].token_ids == want[0]
  assert r.choices[0].message.content == tok.decode(want[0])
  assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("route,body,status", [
    ("completions", {"model": NAME, "prompt": "1+1=", "n": 0}, 400),
    ("completions", {"model": NAME, "prompt": "1+1=", "max_tokens": 0}, 400),
    ("completions", {"model": NAME, "prompt": "1+1=", "temperature": -1}, 400),
    ("completions", {"model": NAME, "prompt": "1+1=", "max_tokens": 600}, 400),  # past the 512 positions
    ("completions", {"model": NAME, "prompt": "1+1=", "logit_bias": {}}, 400),  # unsupported field
    ("completions", {"model": NAME, "prompt": "1+1=", "stream": True}, 400),
    ("completions", {"model": NAME, "prompt": []}, 400),
    ("completions", {"model": NAME}, 400),
    ("completions", {"model": "gpt-5", "prompt": "1+1="}, 404),
    ("chat/completions", {"model": NAME, "messages": []}, 400),
    ("chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "hi"}]}, 400),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user"}]}, 400),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1},
     400),
])
def test_bad_requests_get_4xx(served, route, body, status):
  url, _ = served
  r = httpx.post(f"{url}/v1/{route}", json=body, timeout=30)
  assert r.status_code == status, r.text
  assert r.json()["error"]["message"]


def test_bad_requests_through_the_client(served):
  url, _ = served
  client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
  with pytest.raises(openai.BadRequestError, match="positions"):
    client.completions.create(model=NAME, prompt="1+1=", max_tokens=600)
  with pytest.raises(openai.NotFoundError):
    client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
  r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
  assert r.status_code == 400


def test_endpoint_llm_gets_what_local_llm_samples(served):
  """The two LLM backends agree: EndpointLLM over exrl.serve == LocalLLM in this process (prompt i: seed + i)."""
  from exrl.serve.llm import EndpointLLM, GenParams, LocalLLM

  url, model_dir = served
  config, params = hf.load(model_dir)
  local = LocalLLM(config, params, load_tokenizer(model_dir))
  gen = GenParams(n=2, max_tokens=6, temperature=1.0, seed=5)
  remote = EndpointLLM(url + "/v1", NAME).complete(["12+34=", "7+8="], gen)
  for i, prompt in enumerate(["12+34=", "7+8="]):
    want = local.complete([prompt], GenParams(n=2, max_tokens=6, temperature=1.0, seed=5 + i))[0]
    assert [c.token_ids for c in remote[i]] == [c.token_ids for c in want]
    assert [c.text for c in remote[i]] == [c.text for c in want]
