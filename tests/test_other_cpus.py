"""The suite's expectations on x86 CPUs other than the one running it: the selection rules,
routing tests and doctests of the native kernel, and (without the library) the collection of
every test module, in child processes that see an AMX-INT8 CPU (tiles emulated), an
AVX2-only CPU and a machine where the library did not build (`support.simcpu`). A test that
assumed the running CPU's paths ("auto" native for any size, an AVX-512 route, a native path
to parametrize over) fails here instead of on the other machine."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from qjax.integer import kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Fast tests whose expectations depend on the CPU's paths (test_auto_leaves_... simulates the
# AMX grant itself, and reads /proc/cpuinfo, which no simulation changes).
RULES = ("selection_rules or without_the_library or tile_check or _rule or vmap or concurrent "
         "or leading_dims")


def _pytest(cpu: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, QJAX_SIMULATED_CPU=cpu,
             PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
  env.pop("QJAX_INT8_KERNEL", None)
  return subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "support.simcpu", "-p",
       "no:cacheprovider", "-p", "no:randomly", *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


CPUS = [pytest.param("amx", marks=pytest.mark.skipif(
            "vnni" not in kernels.native_paths() or kernels.amx_int8(),
            reason="the AMX emulation needs AVX-512 VNNI; this CPU grants AMX itself")),
        pytest.param("avx2", marks=pytest.mark.skipif(
            "avx2" not in kernels.native_paths(), reason="this CPU (or build) lacks avx2")),
        "none"]


@pytest.mark.parametrize("cpu", CPUS)
def test_rules_and_doctests_hold_on_other_cpus(cpu):
  done = _pytest(cpu, "tests/test_native_kernel.py", "-k", RULES,
                 "qjax/integer/kernels/__init__.py", "qjax/ste.py")
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
  assert " passed" in done.stdout


def test_every_module_collects_without_the_library():
  """Parametrizations over the native paths must collect where there are none."""
  done = _pytest("none", "--collect-only", "tests")
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
