"""The env server: AgentGym-shaped routes, real 4xx codes that leave the server serving, session limits
and idle eviction, and the HTTP client against a real server process on a loopback port."""
import concurrent.futures
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from exrl.envs import make_env
from exrl.envs.client import EnvClient, EnvHTTPError, shared_client
from exrl.envs.experts import run_expert
from exrl.envs.server import ServerConfig, create_app
from tests.envs.server_proc import running_server


def test_routes_match_in_process_env():
  c = TestClient(create_app())
  i = c.post("/maze/create").json()["id"]
  ref = make_env("maze")
  assert c.post("/maze/reset", json={"id": i, "data_idx": 3}).json() == {"observation": ref.reset(3)}
  for action in ("up", "left", "jump", "down"):
    want = ref.step(action)
    assert c.post("/maze/step", json={"id": i, "action": action}).json() == {
        "observation": want.observation, "reward": want.reward, "done": want.done}
  assert c.get("/maze/observation", params={"id": i}).json() == {"observation": ref.observation()}
  assert c.get("/maze/actions", params={"id": i}).json() == {"actions": ["up", "down", "left", "right"]}
  assert c.post("/maze/close", json={"id": i}).json() == {"closed": True}
  assert c.get("/health").json()["sessions"] == 0


def test_bad_requests_get_4xx_and_server_keeps_serving():
  c = TestClient(create_app())
  i = c.post("/wordle/create").json()["id"]
  bad = [
      (c.post("/babyai/create"), 404),
      (c.post("/babyai/step", json={"id": i, "action": "up"}), 404),
      (c.post("/wordle/reset", json={"id": 999, "data_idx": 0}), 404),
      (c.post("/maze/reset", json={"id": i, "data_idx": 0}), 404),  # the id belongs to wordle
      (c.get("/wordle/observation", params={"id": 12345}), 404),
      (c.post("/wordle/step", json={"id": i, "action": "about"}), 409),  # before reset
      (c.post("/wordle/reset", json={"id": i}), 422),
      (c.post("/wordle/reset", json={"id": "zero", "data_idx": 0}), 422),
      (c.post("/wordle/reset", json={"id": i, "data_idx": -1}), 422),
      (c.post("/wordle/reset", content=b"{not json", headers={"content-type": "application/json"}), 422),
      (c.post("/wordle/step", json={"id": i, "action": "a" * 10_000}), 413),
      (c.post("/wordle/step", content=b"x" * 100_000, headers={"content-type": "application/json"}), 413),
      (c.get("/wordle/observation"), 422),
  ]
  for r, status in bad:
    assert r.status_code == status, (r.request.url, r.text)
    assert "detail" in r.json()
  assert c.post("/wordle/reset", json={"id": i, "data_idx": 0}).status_code == 200
  r = c.post("/wordle/step", json={"id": i, "action": "zzzzz"})  # well-formed but illegal: an ordinary step
  assert r.status_code == 200 and r.json()["observation"].startswith("Not in the word list")
  assert c.get("/health").json()["status"] == "ok"


def test_session_limit_and_idle_eviction():
  now = [0.0]
  c = TestClient(create_app(ServerConfig(max_sessions=2, idle_timeout_s=10.0), clock=lambda: now[0]))
  a, b = (c.post("/maze/create").json()["id"] for _ in range(2))
  assert c.post("/maze/create").status_code == 429
  now[0] = 5.0
  c.post("/maze/reset", json={"id": b, "data_idx": 0})  # b is used at t=5, a idles since t=0
  now[0] = 12.0
  new = c.post("/maze/create")
  assert new.status_code == 200 and new.json()["id"] not in (a, b)
  assert c.post("/maze/reset", json={"id": a, "data_idx": 0}).status_code == 404  # evicted
  assert c.post("/maze/reset", json={"id": b, "data_idx": 0}).status_code == 200  # kept


def test_client_against_server_process():
  with running_server() as url:
    for name in ("maze", "wordle", "textcraft"):
      remote = EnvClient(url, name)
      want = run_expert(make_env(name), 5)
      got = run_expert(_ExpertOverHTTP(remote, make_env(name)), 5)
      assert (got.instruction, got.turns, got.reward, got.done) == (want.instruction, want.turns, want.reward,
                                                                   want.done)
      assert remote.max_turns == make_env(name).max_turns
      remote.close()
    with pytest.raises(EnvHTTPError) as err:
      EnvClient(url, "maze").step("a" * 1000)
    assert err.value.status == 413
    with pytest.raises(ValueError, match="no env 'babyai'"):
      EnvClient(url, "babyai")
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_client_bounded_retries_on_dead_port():
  from tests.envs.server_proc import free_port
  t0 = time.time()
  with pytest.raises(ConnectionError, match="after 3 attempts"):
    EnvClient(f"http://127.0.0.1:{free_port()}", "maze", retries=2, backoff_s=0.01, timeout_s=1.0)
  assert time.time() - t0 < 10


def test_step_seq_is_exactly_once():
  c = TestClient(create_app())
  i = c.post("/maze/create").json()["id"]
  c.post("/maze/reset", json={"id": i, "data_idx": 3})
  ref = make_env("maze")
  ref.reset(3)
  first = c.post("/maze/step", json={"id": i, "action": "up", "seq": 0}).json()
  assert first == ref.step("up")._asdict()
  assert c.post("/maze/step", json={"id": i, "action": "up", "seq": 0}).json() == first  # replayed, not applied
  assert c.get("/maze/observation", params={"id": i}).json()["observation"] == ref.observation()
  r = c.post("/maze/step", json={"id": i, "action": "up", "seq": 2})
  assert r.status_code == 409 and "send seq 1" in r.json()["detail"]
  assert c.post("/maze/step", json={"id": i, "action": "left", "seq": 1}).json() == ref.step("left")._asdict()
  assert c.post("/maze/step", json={"id": i, "action": "left", "seq": -1}).status_code == 422


class _LoseReplies:
  """An http client that sends every request, then drops the reply of every other step: the action was
  applied, the caller sees a read error (what a connection closed under a request looks like)."""

  def __init__(self, inner):
    self.inner, self.steps = inner, 0

  def request(self, method, url, **kwargs):
    response = self.inner.request(method, url, **kwargs)
    if url.endswith("/step"):
      self.steps += 1
      if self.steps % 2:
        raise httpx.ReadError("[Errno 9] Bad file descriptor", request=response.request)
    return response


def test_client_retries_lost_step_replies_without_reapplying():
  app = create_app()
  flaky = _LoseReplies(TestClient(app))
  remote = EnvClient("http://testserver", "maze", http=flaky, backoff_s=0.0)
  want = run_expert(make_env("maze"), 4)
  got = run_expert(_ExpertOverHTTP(remote, make_env("maze")), 4)
  assert (got.turns, got.reward, got.done) == (want.turns, want.reward, want.done)
  assert remote.seq == app.state.sessions.items[remote.id].applied == len(want.turns)
  assert flaky.steps == 2 * len(want.turns)  # each step was sent twice and applied once


class _ExpertOverHTTP:
  """Drives the remote env with a shadow in-process env's expert (the expert needs the env's state)."""

  def __init__(self, remote, shadow):
    self.remote, self.shadow, self.name, self.max_turns = remote, shadow, remote.name, remote.max_turns

  def reset(self, idx):
    self.shadow.reset(idx)
    return self.remote.reset(idx)

  def expert_action(self):
    return self.shadow.expert_action()

  def step(self, action):
    self.shadow.step(action)
    return self.remote.step(action)


@pytest.mark.slow
def test_load_64_clients_x_200_steps():
  """The bounded load test of the issue: zero errors (latencies are reported by experiments.bench_env_server)."""
  with running_server() as url:
    with shared_client(64, timeout_s=30.0) as http:
      def worker(k):
        env = EnvClient(url, "maze", http=http)
        env.reset(k)
        for s in range(200):
          obs, _, done = env.step(("up", "down", "left", "right")[(k + s) % 4])
          if done:
            env.reset(k + s)
        env.close()
        return 200
      with concurrent.futures.ThreadPoolExecutor(64) as ex:
        assert sum(ex.map(worker, range(64))) == 64 * 200
    assert httpx.get(url + "/health").json()["sessions"] == 0
