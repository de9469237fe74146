"""experiments/sharded_qat.py end to end, in a child process (it needs 8 simulated devices,
which XLA fixes when its backend starts): a --quick run by default, the full run under -m slow."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(out, *args):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)   # the script sets its own device count
  done = subprocess.run([sys.executable, "-m", "experiments.sharded_qat", "--out", str(out),
                         *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=1800, check=False)
  assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
  return done.stdout, json.loads((out / "results.json").read_text())


def _check(out, results):
  assert "kernel bytes per device" in out and "median train step" in out
  assert results["jax"]["devices"] == 8
  assert set(results["kernel_specs"].values()) == {"P(None, 'model')"}
  b = results["bytes_per_device"]
  # Kernels split over 2 model shards; int8 is a quarter of float32.
  assert b["float32_kernels"] * 2 == b["float32_kernels_one_device"] == 4 * (784 + 100 + 10) * 100
  assert b["int8_kernels"] * 4 == b["float32_kernels"]
  assert results["quant_stats_equal_after_first_step"] is True
  assert results["step_seconds"]["ratio_sharded_to_one"] > 0


def test_sharded_qat_quick(tmp_path):
  out, results = _run(tmp_path, "--quick", "--steps", "4")
  _check(out, results)
  assert results["config"]["steps"] == 4
  # A few steps apart, the two runs differ by float rounding only. (Over hundreds of QAT
  # steps a rounding difference can move a weight across a grid step, and the runs drift
  # further apart: 6e-2 after the full run's 200 steps, at the same accuracy.)
  assert results["params_max_abs_difference"] < 1e-4


def test_sharded_qat_refuses_too_few_devices():
  """Imported into a process whose JAX already runs on one device, it says what to do."""
  code = ("import jax; jax.devices(); from experiments import sharded_qat; "
          "sharded_qat.main(['--quick'])")
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert done.returncode != 0
  assert "needs 8 devices" in done.stderr and "fresh process" in done.stderr


@pytest.mark.slow
def test_sharded_qat_full(tmp_path):
  out, results = _run(tmp_path)
  _check(out, results)
  assert results["qat_accuracy_sharded"] > 0.85
