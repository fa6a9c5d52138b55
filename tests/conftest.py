"""Test set-up: 8 forced host devices so sharded code is exercised on CPU."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Drop every compiled executable after each test module. XLA:CPU maps each executable's code into memory and JAX
  caches executables for the life of the process, so one pytest process over the whole suite neared Linux's
  vm.max_map_count (65,530 mappings) and segfaulted inside an XLA compile in the last test module."""
  yield
  jax.clear_caches()
  gc.collect()
