"""Experiments run end to end: a --quick smoke run by default, the full study under -m slow."""

import json

import pytest
from support.experiments import load_experiment, user_promotion_rules  # noqa: F401


def _rows(results, scheme):
  return {r["bits"]: r for r in results["rows"] if r["scheme"] == scheme}


def test_mnist_bits_quick(tmp_path, capsys):
  results = load_experiment("mnist_bits").main(["--quick", "--out", str(tmp_path)])
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
  results = load_experiment("mnist_bits").main(["--out", str(tmp_path), "--plot"])
  assert (tmp_path / "accuracy_vs_bits.png").stat().st_size > 0
  float_acc = results["float"]["accuracy"]
  per_channel = _rows(results, "per-channel symmetric")
  assert abs(per_channel[8]["ptq_accuracy"] - float_acc) <= 0.005
  assert per_channel[2]["qat_accuracy"] > per_channel[2]["ptq_accuracy"]
  for scheme in ("per-tensor affine", "per-tensor symmetric", "per-channel symmetric"):
    sqnr = [r["weight_sqnr_db"] for _, r in sorted(_rows(results, scheme).items())]
    assert sqnr == sorted(sqnr), f"{scheme}: SQNR must grow with the bit width"


def test_bench_qat_smoke():
  """The QAT benchmark runs (tiny batch, one step, no timing claims) and its evidence checks
  see qjax's fake quantization: rounding in the forward pass, logits that differ from float,
  and a gradient for every parameter."""
  results = load_experiment("bench_qat").main(["--reps", "1", "--rounds", "1", "--models", "mlp,lenet5",
                                     "--batch", "4", "--min-round-seconds", "0"])
  rows = {(r["model"], r["variant"]): r for r in results["rows"]}
  for model in ("mlp", "lenet5"):
    assert rows[(model, "float32")]["evidence"]["round_ops"] == 0
    qat = rows[(model, "qjax int8 QAT")]["evidence"]
    assert qat["round_ops"] > 0 and 0 < qat["rel_err_logits"] < 0.1
    assert qat["zero_grad_leaves"] == []
