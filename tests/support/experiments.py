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
