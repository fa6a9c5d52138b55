"""The environment HTTP server (AgentGym's routes, with real error codes), bound to 127.0.0.1 by default.

  python -m exrl.envs.server --port 8765 [--host 127.0.0.1] [--max-sessions 1024] [--idle-timeout-s 600]

Per env NAME in `exrl.envs.ENVS` (maze, wordle, textcraft):
  POST /NAME/create                         -> {"id": int}
  POST /NAME/reset {"id", "data_idx"}       -> {"observation": str}
  POST /NAME/step {"id", "action", "seq"?}  -> {"observation": str, "reward": float, "done": bool}
  GET  /NAME/observation?id=N               -> {"observation": str}
  GET  /NAME/actions?id=N                   -> {"actions": [str]}
  POST /NAME/close {"id"}                   -> {"closed": true}
  GET  /health                              -> {"status": "ok", "sessions": int, "envs": {NAME: {"max_turns"}}}
Errors are JSON `{"detail": ...}` with a 4xx status: unknown env or id 404, malformed body 422, oversized
action or body 413, step before reset 409, too many sessions 429. An illegal but well-formed action is an
ordinary step. Sessions past `max_sessions` evict the longest-idle one only if it has been idle for
`idle_timeout_s`; otherwise create answers 429.

Exactly-once steps: a step may carry `seq`, the number of seq'd steps this session has applied. The server
applies seq == applied, replays its last reply for seq == applied - 1 (a retry whose reply was lost), and
answers 409 to any other seq, so a client can retry a step after any transport error without applying it twice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import socket
import subprocess
import sys
import time

import tyro
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from exrl.envs import ENVS, make_env
from exrl.envs.protocol import MAX_ACTION_CHARS

MAX_BODY_BYTES = 16 * 1024


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  port: int = 8765
  host: str = "127.0.0.1"  # loopback only unless asked: the envs run no auth
  seed: int = 0  # every env's instance seed: data_idx picks the instance
  max_sessions: int = 1024
  idle_timeout_s: float = 600.0


class _Body(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True)


class IdBody(_Body):
  id: int


class ResetBody(_Body):
  id: int
  data_idx: int = Field(ge=0)


class StepBody(_Body):
  id: int
  action: str
  seq: int | None = Field(default=None, ge=0)  # exactly-once retries (module docstring)


@dataclasses.dataclass
class Session:
  name: str
  env: object
  used: float  # clock() at the last request
  applied: int = 0  # seq'd steps applied
  reply: dict | None = None  # the last seq'd step's reply, replayed to a retry


class ApiError(Exception):
  def __init__(self, status: int, detail: str):
    self.status, self.detail = status, detail


class Sessions:
  """id -> `Session`; ids are never reused."""

  def __init__(self, cfg: ServerConfig, clock=time.monotonic):
    self.cfg, self.clock = cfg, clock
    self.items: dict[int, Session] = {}
    self.ids = itertools.count()

  def create(self, name: str) -> int:
    now = self.clock()
    if len(self.items) >= self.cfg.max_sessions:
      self.evict_idle(now)
    if len(self.items) >= self.cfg.max_sessions:
      raise ApiError(429, f"all {self.cfg.max_sessions} sessions are in use and none has been idle "
                          f"{self.cfg.idle_timeout_s} s; close sessions you no longer need")
    i = next(self.ids)
    self.items[i] = Session(name, make_env(name, seed=self.cfg.seed), now)
    return i

  def evict_idle(self, now: float) -> None:
    for i in [i for i, s in self.items.items() if now - s.used > self.cfg.idle_timeout_s]:
      del self.items[i]

  def session(self, name: str, i: int) -> Session:
    s = self.items.get(i)
    if s is None or s.name != name:
      raise ApiError(404, f"unknown {name} session id {i} (never created, closed, or evicted after "
                          f"{self.cfg.idle_timeout_s} s idle); create one with POST /{name}/create")
    s.used = self.clock()
    return s

  def get(self, name: str, i: int):
    return self.session(name, i).env


def create_app(cfg: ServerConfig = ServerConfig(), clock=time.monotonic) -> FastAPI:
  app = FastAPI(title="exrl envs")
  sessions = Sessions(cfg, clock)
  app.state.sessions = sessions

  @app.exception_handler(ApiError)
  async def _api_error(request: Request, exc: ApiError):
    return JSONResponse({"detail": exc.detail}, status_code=exc.status)

  @app.middleware("http")
  async def _limit_body(request: Request, call_next):
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
      return JSONResponse({"detail": f"body of {size} bytes; the limit is {MAX_BODY_BYTES}"}, status_code=413)
    return await call_next(request)

  def env_name(name: str) -> str:
    if name not in ENVS:
      raise ApiError(404, f"unknown env {name!r}; this server has {sorted(ENVS)}")
    return name

  @app.get("/health")
  async def health():
    return {"status": "ok", "sessions": len(sessions.items),
            "envs": {n: {"max_turns": c.max_turns} for n, c in ENVS.items()}}

  @app.post("/{env}/create")
  async def create(env: str):
    return {"id": sessions.create(env_name(env))}

  @app.post("/{env}/reset")
  async def reset(env: str, body: ResetBody):
    return {"observation": sessions.get(env_name(env), body.id).reset(body.data_idx)}

  @app.post("/{env}/step")
  async def step(env: str, body: StepBody):
    s = sessions.session(env_name(env), body.id)
    if len(body.action) > MAX_ACTION_CHARS:
      raise ApiError(413, f"action of {len(body.action)} characters; the limit is {MAX_ACTION_CHARS}")
    if body.seq is not None and body.seq != s.applied:
      if body.seq == s.applied - 1 and s.reply is not None:
        return s.reply  # a retry of a step that was applied but whose reply was lost
      raise ApiError(409, f"{env} session {body.id}: step seq {body.seq}, but {s.applied} seq'd steps were "
                          f"applied; send seq {s.applied} for a new step or {s.applied - 1} to retry the last")
    try:
      obs, reward, done = s.env.step(body.action)
    except RuntimeError as err:  # step before reset
      raise ApiError(409, str(err)) from err
    reply = {"observation": obs, "reward": float(reward), "done": bool(done)}
    if body.seq is not None:
      s.applied, s.reply = s.applied + 1, reply
    return reply

  @app.get("/{env}/observation")
  async def observation(env: str, id: int):
    return {"observation": sessions.get(env_name(env), id).observation()}

  @app.get("/{env}/actions")
  async def actions(env: str, id: int):
    e = sessions.get(env_name(env), id)
    if not e._started:
      raise ApiError(409, f"{env} session {id} has not been reset; its actions depend on the instance")
    return {"actions": e.available_actions()}

  @app.post("/{env}/close")
  async def close(env: str, body: IdBody):
    sessions.get(env_name(env), body.id)
    del sessions.items[body.id]
    return {"closed": True}

  return app


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*args: str, timeout_s: float = 60.0, module: str = "exrl.envs.server"):
  """Start `python -m MODULE --port P *args` (a server with GET /health) on a free loopback port P; yields its
  base URL, stops it after."""
  import httpx
  port = free_port()
  proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.time() + timeout_s
    while True:
      if proc.poll() is not None:
        raise RuntimeError(f"{module} exited with {proc.returncode}: {proc.stdout.read().decode()}")
      try:
        if httpx.get(url + "/health", timeout=1.0).status_code == 200:
          break
      except httpx.TransportError:
        pass
      if time.time() > deadline:
        raise TimeoutError(f"{module} on port {port} not healthy after {timeout_s} s")
      time.sleep(0.1)
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(10)
    except subprocess.TimeoutExpired:
      proc.kill()


def main(cfg: ServerConfig) -> None:
  import uvicorn  # only the CLI needs it; tests drive the app in-process or via this entry point
  print(f"[exrl.envs.server] serving {sorted(ENVS)} on http://{cfg.host}:{cfg.port}", flush=True)
  # Keep-alive longer than httpx's 5 s pool expiry, so the client always drops an idle connection first
  # (equal timeouts race: a reused connection gets reset under load).
  uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
              timeout_keep_alive=30, backlog=4096)


if __name__ == "__main__":
  main(tyro.cli(ServerConfig))
