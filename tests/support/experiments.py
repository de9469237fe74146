"""Shared by the experiment tests: import a module of the experiments package, run it as user
code."""

import importlib
import pathlib
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_experiment(name: str):
  """The module experiments.<name>, imported from the repository root (as `python -m
  experiments.<name>` does)."""
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  return importlib.import_module(f"experiments.{name}")


@pytest.fixture(autouse=True)
def user_promotion_rules():
  """Experiments are user code: run them under JAX's default promotion, not conftest's strict."""
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    yield


def check_sharded_qat(out: str, results: dict) -> None:
  """What every run of experiments/sharded_qat.py must show: its printed report (`out`) and
  results.json."""
  assert "kernel bytes per device" in out and "median train step" in out
  assert results["jax"]["devices"] == 8
  assert set(results["kernel_specs"].values()) == {"P(None, 'model')"}
  b = results["bytes_per_device"]
  # Kernels split over 2 model shards; int8 is a quarter of float32.
  assert b["float32_kernels"] * 2 == b["float32_kernels_one_device"] == 4 * (784 + 100 + 10) * 100
  assert b["int8_kernels"] * 4 == b["float32_kernels"]
  assert results["quant_stats_equal_after_first_step"] is True
  assert results["step_seconds"]["ratio_sharded_to_one"] > 0
