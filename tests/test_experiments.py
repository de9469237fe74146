"""Experiments run end to end: a --quick smoke run by default, the full study under -m slow."""

import importlib.util
import json
import pathlib
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[f"experiments_{name}"] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


@pytest.fixture(autouse=True)
def _user_promotion_rules():
  """Experiments are user code: run them under JAX's default promotion, not conftest's strict."""
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    yield


def _rows(results, scheme):
  return {r["bits"]: r for r in results["rows"] if r["scheme"] == scheme}


def test_mnist_bits_quick(tmp_path, capsys):
  results = _load("mnist_bits").main(["--quick", "--out", str(tmp_path)])
  assert "per-channel symmetric" in capsys.readouterr().out
  assert json.loads((tmp_path / "results.json").read_text()) == results
  assert results["data"]["train"] == 4000 and results["data"]["test"] == 1000
  float_acc = results["float"]["accuracy"]
  assert float_acc > 0.8, "two float epochs on 4,000 MNIST digits should pass 80 %"
  for scheme in ("per-tensor affine", "per-tensor symmetric", "per-channel symmetric"):
    rows = _rows(results, scheme)
    assert set(rows) == {8, 4}
    # 6 dB per bit: four bits fewer must cost well over 15 dB of weight SQNR.
    assert rows[8]["weight_sqnr_db"] > rows[4]["weight_sqnr_db"] + 15
    assert abs(rows[8]["ptq_accuracy"] - float_acc) <= 0.01
    assert rows[4]["weight_bytes_packed"] < rows[8]["weight_bytes_packed"]
  assert _rows(results, "per-channel symmetric")[4]["qat_accuracy"] is not None


@pytest.mark.slow
def test_mnist_bits_full(tmp_path):
  results = _load("mnist_bits").main(["--out", str(tmp_path), "--plot"])
  assert (tmp_path / "accuracy_vs_bits.png").stat().st_size > 0
  float_acc = results["float"]["accuracy"]
  per_channel = _rows(results, "per-channel symmetric")
  assert abs(per_channel[8]["ptq_accuracy"] - float_acc) <= 0.005
  assert per_channel[2]["qat_accuracy"] > per_channel[2]["ptq_accuracy"]
  for scheme in ("per-tensor affine", "per-tensor symmetric", "per-channel symmetric"):
    sqnr = [r["weight_sqnr_db"] for _, r in sorted(_rows(results, scheme).items())]
    assert sqnr == sorted(sqnr), f"{scheme}: SQNR must grow with the bit width"
