"""An `Env` over HTTP (httpx): the same protocol as the in-process envs, so the same rollout drives both.

Timeouts on every request. Retries are bounded and never double-apply an action: a request that never
connected is retried for every route; any other transport error (a read timeout, a reset or closed
connection) or a 5xx only for the idempotent ones (reset, observation, actions, close, health) and for step,
which carries the server's exactly-once `seq` (see `exrl.envs.server`). Only create is not retried after it
was sent: a lost create leaves an orphan session that idle eviction removes. A 4xx raises `EnvHTTPError`
with the server's detail.
"""
from __future__ import annotations

import time

import httpx

from exrl.envs.protocol import StepResult


class EnvHTTPError(RuntimeError):
  def __init__(self, status: int, detail, route: str):
    super().__init__(f"{route} -> HTTP {status}: {detail}")
    self.status, self.detail = status, detail


def _request(http: httpx.Client, method: str, route: str, *, idempotent: bool, retries: int, backoff_s: float,
             **kwargs) -> dict:
  for attempt in range(retries + 1):
    try:
      r = http.request(method, route, **kwargs)
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
      err = e
    except httpx.TransportError as e:  # sent, perhaps applied: read/write errors and timeouts, protocol errors
      if not idempotent:
        raise
      err = e
    else:
      if r.status_code < 400:
        return r.json()
      if r.status_code < 500 or not idempotent:
        try:
          detail = r.json().get("detail")
        except ValueError:
          detail = r.text
        raise EnvHTTPError(r.status_code, detail, f"{method} {route}")
      err = EnvHTTPError(r.status_code, r.text, f"{method} {route}")
    if attempt < retries:
      time.sleep(backoff_s * 2 ** attempt)
  raise ConnectionError(f"{method} {route} failed after {retries + 1} attempts: {err}") from err


def shared_client(max_connections: int, timeout_s: float = 10.0) -> httpx.Client:
  """One `httpx.Client` for many threads' sessions. Every connection may stay alive: with fewer keep-alive
  slots than connections, httpcore's pool closes "surplus" idle connections, including one it has just
  handed to another thread (encode/httpcore#1110), which fails that request with EBADF under load."""
  return httpx.Client(timeout=timeout_s, limits=httpx.Limits(max_connections=max_connections,
                                                             max_keepalive_connections=max_connections))


class EnvClient:
  """One session of env `name` on the server at `base_url`; `close()` ends the session.

  http: a shared `httpx.Client` (many sessions over one connection pool); default: a private one.
  """

  def __init__(self, base_url: str, name: str, *, http: httpx.Client | None = None, timeout_s: float = 10.0,
               retries: int = 3, backoff_s: float = 0.05):
    self.name, self.retries, self.backoff_s = name, retries, backoff_s
    self._own = http is None
    self.http = http or httpx.Client(timeout=timeout_s)
    self.base = base_url.rstrip("/")
    info = self._call("GET", "/health", idempotent=True)
    if name not in info["envs"]:
      raise ValueError(f"server {base_url} has no env {name!r}; it serves {sorted(info['envs'])}")
    self.max_turns = int(info["envs"][name]["max_turns"])
    self.id = self._call("POST", f"/{name}/create", idempotent=False)["id"]
    self.seq = 0  # steps applied by the server in this session (exactly-once retries)

  def _call(self, method: str, route: str, *, idempotent: bool, **kwargs) -> dict:
    return _request(self.http, method, self.base + route, idempotent=idempotent, retries=self.retries,
                    backoff_s=self.backoff_s, **kwargs)

  def reset(self, idx: int) -> str:
    return self._call("POST", f"/{self.name}/reset", idempotent=True,
                      json={"id": self.id, "data_idx": int(idx)})["observation"]

  def step(self, action: str) -> StepResult:
    r = self._call("POST", f"/{self.name}/step", idempotent=True,
                   json={"id": self.id, "action": action, "seq": self.seq})
    self.seq += 1
    return StepResult(r["observation"], float(r["reward"]), bool(r["done"]))

  def observation(self) -> str:
    return self._call("GET", f"/{self.name}/observation", idempotent=True, params={"id": self.id})["observation"]

  def available_actions(self) -> list[str]:
    return self._call("GET", f"/{self.name}/actions", idempotent=True, params={"id": self.id})["actions"]

  def close(self) -> None:
    try:
      self._call("POST", f"/{self.name}/close", idempotent=True, json={"id": self.id})
    except EnvHTTPError as e:
      if e.status != 404:  # already closed or evicted is fine
        raise
    finally:
      if self._own:
        self.http.close()
