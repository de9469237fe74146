"""Shared by the experiment tests: load a script from experiments/, run it as user code."""

import importlib.util
import pathlib
import sys

import jax
import pytest

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[2] / "experiments"


def load_experiment(name: str):
  """The module experiments/<name>.py. experiments/ is no package: its scripts import their
  siblings (mnist_data, models) by plain name, as they do when run from the command line."""
  if str(EXPERIMENTS) not in sys.path:
    sys.path.insert(0, str(EXPERIMENTS))
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[f"experiments_{name}"] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


@pytest.fixture(autouse=True)
def user_promotion_rules():
  """Experiments are user code: run them under JAX's default promotion, not conftest's strict."""
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    yield
