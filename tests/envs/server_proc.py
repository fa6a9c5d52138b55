"""Start `python -m exrl.envs.server` on a free loopback port for a test, and stop it after."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*args: str, timeout_s: float = 60.0):
  """Yields the base URL of a server subprocess; kills it (by its own pid) on exit."""
  port = free_port()
  proc = subprocess.Popen([sys.executable, "-m", "exrl.envs.server", "--port", str(port), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.time() + timeout_s
    while True:
      if proc.poll() is not None:
        raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read().decode()}")
      try:
        if httpx.get(url + "/health", timeout=1.0).status_code == 200:
          break
      except httpx.TransportError:
        pass
      if time.time() > deadline:
        raise TimeoutError(f"server on port {port} not healthy after {timeout_s} s")
      time.sleep(0.1)
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(10)
    except subprocess.TimeoutExpired:
      proc.kill()
