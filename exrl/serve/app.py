"""An OpenAI-compatible HTTP server over exrl's JAX sampler (`LocalLLM`), bound to 127.0.0.1 by default.

  python -m exrl.serve --model DIR [--port 8000] [--host 127.0.0.1] [--served-model-name NAME]

DIR is a local HF directory (config.json, *.safetensors, and a tokenizer: HF files or one SentencePiece *.model).
Routes:
  POST /v1/completions       {"model", "prompt": str | [str], "max_tokens"=16, "temperature"=1, "top_p"=1, "n"=1,
                              "seed", "stop"}
  POST /v1/chat/completions  {"model", "messages": [{"role", "content"}], "max_tokens" | "max_completion_tokens",
                              "temperature", "top_p", "n", "seed", "stop"}
  GET  /v1/models, GET /health
Replies follow OpenAI's schema; each choice also carries `token_ids` (the sampled ids, as vLLM's
`return_token_ids` does). temperature 0 is greedy. A request without a seed gets `--seed` + its request number.
Bad requests answer 400 in OpenAI's error format (`{"error": {"message", "type", "param", "code"}}`): unknown
fields, bad values, streaming (not supported), a prompt too long for the model; an unknown model answers 404.
Requests are served one at a time (the sampler holds the device); sampling is deterministic in the seed.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from exrl.serve.llm import GenParams, LocalLLM

MAX_N = 64


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  model: str = ""  # local HF directory with the weights and the tokenizer
  host: str = "127.0.0.1"  # loopback only unless asked: the server runs no auth
  port: int = 8000
  served_model_name: str = ""  # the name clients pass as "model"; default: the directory's name
  param_dtype: Literal["float32", "bfloat16"] = "float32"
  compute_dtype: Literal["float32", "bfloat16"] = "float32"
  batch_size: int = 64  # most prompts sampled in one device batch
  seed: int = 0


class _Request(BaseModel):
  model_config = ConfigDict(extra="forbid")
  model: str
  max_tokens: int | None = Field(default=None, ge=1)
  temperature: float = Field(default=1.0, ge=0.0, le=2.0)
  top_p: float = Field(default=1.0, gt=0.0, le=1.0)
  n: int = Field(default=1, ge=1, le=MAX_N)
  seed: int | None = Field(default=None, ge=0, lt=2**31)
  stop: str | list[str] | None = None
  stream: bool = False
  user: str | None = None
  presence_penalty: float = 0.0  # accepted only at 0: the sampler has no penalties
  frequency_penalty: float = 0.0


class CompletionRequest(_Request):
  prompt: str | list[str]


class Message(BaseModel):
  model_config = ConfigDict(extra="forbid")
  role: Literal["system", "user", "assistant"]
  content: str


class ChatRequest(_Request):
  messages: list[Message] = Field(min_length=1)
  max_completion_tokens: int | None = Field(default=None, ge=1)


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
    self.status, self.message, self.param, self.code = status, message, param, code


def _error_body(message: str, param=None, code=None, kind="invalid_request_error") -> dict:
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(llm: LocalLLM, model_name: str, seed: int = 0) -> FastAPI:
  app = FastAPI(title="exrl OpenAI-compatible server")
  lock = threading.Lock()  # one generation at a time on the device
  counter = itertools.count()

  @app.exception_handler(ApiError)
  async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(_error_body(exc.message, exc.param, exc.code), status_code=exc.status)

  @app.exception_handler(RequestValidationError)
  async def _invalid(request: Request, exc: RequestValidationError):
    errs = exc.errors()
    where = ".".join(str(x) for x in errs[0]["loc"][1:]) if errs else None
    msg = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errs[:5])
    return JSONResponse(_error_body(msg or "invalid request", where), status_code=400)

  def gen_params(req: _Request, max_tokens: int | None, number: int) -> GenParams:
    if req.model != model_name:
      raise ApiError(404, f"model {req.model!r} does not exist; this server serves {model_name!r}", "model",
                     "model_not_found")
    if req.stream:
      raise ApiError(400, "stream=true is not supported by exrl.serve; send stream=false", "stream")
    for name in ("presence_penalty", "frequency_penalty"):
      if getattr(req, name):
        raise ApiError(400, f"{name}={getattr(req, name)} is not supported; exrl's sampler has no penalties "
                            "(send 0)", name)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
      raise ApiError(400, f"stop={req.stop!r}: at most 4 non-empty strings", "stop")
    return GenParams(n=req.n, max_tokens=max_tokens or 16, temperature=req.temperature, top_p=req.top_p,
                     seed=req.seed if req.seed is not None else seed + number, stop=tuple(stop))

  def run(kind: str, prompts_ids: list[list[int]], gen: GenParams, number: int) -> tuple[list, dict]:
    with lock:
      outs = llm.generate(prompts_ids, gen)
    for comps in outs:
      if comps and comps[0].error:
        raise ApiError(400, comps[0].error, "messages" if kind == "chat" else "prompt", "invalid_prompt")
    usage = {"prompt_tokens": sum(len(p) for p in prompts_ids),
             "completion_tokens": sum(c.completion_tokens for cs in outs for c in cs)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return [c for cs in outs for c in cs], usage

  @app.get("/health")
  def health():
    return {"status": "ok", "model": model_name}

  @app.get("/v1/models")
  def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "exrl"}]}

  @app.post("/v1/completions")
  def completions(req: CompletionRequest):
    number = next(counter)
    gen = gen_params(req, req.max_tokens, number)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts:
      raise ApiError(400, "prompt is an empty list; send at least one prompt", "prompt")
    choices, usage = run("completion", [llm.encode(p) for p in prompts], gen, number)
    return {"id": f"cmpl-{number}", "object": "text_completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason,
                         "token_ids": list(c.token_ids)} for i, c in enumerate(choices)],
            "usage": usage}

  @app.post("/v1/chat/completions")
  def chat_completions(req: ChatRequest):
    number = next(counter)
    if req.max_tokens and req.max_completion_tokens and req.max_tokens != req.max_completion_tokens:
      raise ApiError(400, f"max_tokens={req.max_tokens} and max_completion_tokens={req.max_completion_tokens} "
                          "disagree; send one", "max_tokens")
    gen = gen_params(req, req.max_completion_tokens or req.max_tokens, number)
    text = llm.chat_text([m.model_dump() for m in req.messages])
    choices, usage = run("chat", [llm.encode(text, templated=llm.use_template)], gen, number)
    return {"id": f"chatcmpl-{number}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                         "finish_reason": c.finish_reason, "token_ids": list(c.token_ids)}
                        for i, c in enumerate(choices)],
            "usage": usage}

  return app


def load_llm(cfg: ServeConfig) -> tuple[LocalLLM, str]:
  """The model and tokenizer in `cfg.model` as a `LocalLLM`, and the name it is served under."""
  from pathlib import Path

  from exrl.models import hf
  from exrl.tokenizer import load_tokenizer

  if not cfg.model:
    raise ValueError("--model is required: a local HF directory (config.json, *.safetensors, tokenizer files)")
  path = Path(cfg.model)
  if not path.is_dir():
    raise FileNotFoundError(f"--model {cfg.model!r} is not a directory")
  tokenizer = load_tokenizer(path)
  config, params = hf.load(path, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype)
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f"tokenizer in {path} has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}")
  name = cfg.served_model_name or path.resolve().name
  return LocalLLM(config, params, tokenizer, name=name, batch_size=cfg.batch_size), name


def main(cfg: ServeConfig) -> None:
  import uvicorn  # only the CLI needs it; tests drive the app through their own uvicorn server

  llm, name = load_llm(cfg)
  print(f"[exrl.serve] {name} ({llm.config.model_type}, V={llm.config.vocab_size}) on "
        f"http://{cfg.host}:{cfg.port}/v1", flush=True)
  uvicorn.run(create_app(llm, name, cfg.seed), host=cfg.host, port=cfg.port, log_level="warning",
              timeout_keep_alive=30)
