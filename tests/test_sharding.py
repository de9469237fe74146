"""The sharded tests (tests/sharded, experiments/sharded_qat.py's --quick run among them) on a
simulated mesh of 8 CPU devices.

XLA fixes the number of host devices when the backend starts, so they run in a child pytest
process started with XLA_FLAGS=--xla_force_host_platform_device_count=8; this process keeps
one device. The child's report is printed when it fails.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_sharded_suite_on_eight_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  env["QJAX_SHARDED_TESTS"] = "1"
  env.pop("PYTEST_XDIST_WORKER", None)
  done = subprocess.run(
      [sys.executable, "-m", "pytest", "-n", "0", "-q", "-p", "no:cacheprovider",
       str(ROOT / "tests" / "sharded")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
  report = done.stdout[-20000:] + done.stderr[-5000:]
  assert done.returncode == 0, report
  assert " passed" in done.stdout, report
