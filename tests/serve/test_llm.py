"""`EndpointLLM`: retries, time-outs and 4xx handling against a scripted transport (no server needed)."""
from __future__ import annotations

import json

import httpx
import pytest

from exrl.serve.llm import EndpointError, EndpointLLM, GenParams, cut_at_stop


def _llm(handler, **kw) -> EndpointLLM:
  return EndpointLLM("http://test/v1", "m", http=httpx.Client(transport=httpx.MockTransport(handler)),
                     backoff_s=0.0, **kw)


def _reply(body: dict, chat: bool) -> dict:
  choice = (lambda i: {"index": i, "message": {"role": "assistant", "content": f"c{i}"}, "finish_reason": "stop"}
            ) if chat else (lambda i: {"index": i, "text": f"t{i}", "finish_reason": "length"})
  return {"choices": [choice(i) for i in reversed(range(body["n"]))],
          "usage": {"prompt_tokens": 5, "completion_tokens": 4 * body["n"]}}


def test_retries_transient_failures_then_succeeds():
  seen = []

  def handler(request: httpx.Request):
    body = json.loads(request.content)
    seen.append((request.url.path, body["seed"]))
    if len(seen) == 1:
      raise httpx.ReadTimeout("slow", request=request)
    if len(seen) <= 3:
      return httpx.Response(503 if len(seen) == 2 else 429, text="busy")
    return httpx.Response(200, json=_reply(body, chat="messages" in body))

  out = _llm(handler, retries=3).chat([[{"role": "user", "content": "hi"}]], GenParams(n=2, seed=9))
  assert [c.text for c in out[0]] == ["c0", "c1"] and out[0][0].completion_tokens == 4
  assert seen == [("/v1/chat/completions", 9)] * 4


def test_4xx_is_that_prompts_error_and_others_succeed():
  def handler(request: httpx.Request):
    body = json.loads(request.content)
    if body["prompt"] == "too long":
      return httpx.Response(400, json={"error": {"message": "context length exceeded"}})
    return httpx.Response(200, json=_reply(body, chat=False))

  out = _llm(handler).complete(["a", "too long", "b"], GenParams(n=1, seed=0))
  assert [c.finish_reason for cs in out for c in cs] == ["length", "error", "length"]
  assert "context length" in out[1][0].error


def test_persistent_failure_raises_after_retries():
  calls = []

  def handler(request: httpx.Request):
    calls.append(1)
    return httpx.Response(500, text="boom")

  with pytest.raises(EndpointError, match="after 3 attempts"):
    _llm(handler, retries=2).complete(["a"], GenParams())
  assert len(calls) == 3


def test_bad_endpoint_arguments():
  with pytest.raises(ValueError, match="http"):
    EndpointLLM("localhost:8000", "m")
  with pytest.raises(ValueError, match="name the model"):
    EndpointLLM("http://x/v1", "")


def test_cut_at_stop():
  assert cut_at_stop("12\n34", ["\n", "3"]) == ("12", True)
  assert cut_at_stop("1234", ["x"]) == ("1234", False)
