"""A pytest plugin that makes this process see another x86 CPU's native kernel library, so
that the suite's expectations can be checked against CPUs the machine running it is not:

  QJAX_SIMULATED_CPU=amx       AMX-INT8 granted: "amx" among the native paths, running the tile
                               kernel with its tiles emulated in C++ ("amx_emulated"), and
                               `kernels.amx_int8()` True ("auto" then gives large products to
                               XLA); needs an AVX-512 VNNI CPU
  QJAX_SIMULATED_CPU=avx2      AVX2 only (no AVX-512 paths)
  QJAX_SIMULATED_CPU=portable  no SIMD path
  QJAX_SIMULATED_CPU=none      the library not built (one warning; everything on XLA)

Load it with `python -m pytest -p support.simcpu` from tests/ on sys.path. Importing the module
changes nothing: the simulation starts in `pytest_configure`, which pytest calls on plugins only.
"""

from __future__ import annotations

import functools
import os
import warnings

import pytest

from qjax.integer import kernels

ENV_VAR = "QJAX_SIMULATED_CPU"
CPUS = ("amx", "avx2", "portable", "none")
_CPU = os.environ.get(ENV_VAR, "")

# The library's own bits: 1 portable, 2 avx2, 4 vnni, 8 amx, 32 AVX-512 VBMI.
_real_load = kernels._load.__wrapped__  # pylint: disable=protected-access


@functools.cache
def _simulated_load() -> int:
  bits = _real_load()
  if not bits:  # not built (or made to look so by a test): nothing to simulate
    return bits
  if _CPU == "amx":
    if not bits & 4:
      raise RuntimeError(f"{ENV_VAR}=amx emulates the tiles on AVX-512 VNNI, which this CPU "
                         f"lacks")
    return bits | 8
  if _CPU == "avx2":
    return bits & (1 | 2)
  if _CPU == "portable":
    return bits & 1
  warnings.warn("qjax.integer.kernels: the native int8 GEMM library is not built (simulated); "
                "the integer path runs on XLA's dot_general.", RuntimeWarning, stacklevel=3)
  return 0


def pytest_configure(config: pytest.Config) -> None:
  """Makes the kernels module see the simulated CPU (before any test is collected)."""
  del config
  if _CPU not in CPUS:
    raise pytest.UsageError(f"{ENV_VAR} must be one of {list(CPUS)}; got {_CPU!r}.")
  kernels._load = _simulated_load  # pylint: disable=protected-access
  if _CPU == "amx":
    kernels._PATH_IDS["amx"] = kernels._PATH_IDS["amx_emulated"]  # pylint: disable=protected-access
