"""Tests that need a mesh of 8 CPU devices.

They run in their own process (`tests/test_sharding.py` starts it with
XLA_FLAGS=--xla_force_host_platform_device_count=8), so the rest of the suite keeps one device.
To run them directly:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 QJAX_SHARDED_TESTS=1 \
      python -m pytest -n 0 tests/sharded
"""

import jax
import pytest

DEVICES = 8


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  if jax.device_count() != DEVICES:
    pytest.fail(f"tests/sharded needs {DEVICES} devices; this process has "
                f"{jax.device_count()}. Set XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{DEVICES} before JAX starts.")
