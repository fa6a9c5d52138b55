"""The env server as a subprocess on a free loopback port (re-exported for tests)."""
from exrl.envs.server import free_port, running_server  # noqa: F401
