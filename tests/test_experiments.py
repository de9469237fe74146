"""Experiments run end to end: a --quick smoke run by default, the full study under -m slow."""

import json

import pytest
from support.experiments import load_experiment, user_promotion_rules  # noqa: F401


def _rows(results, scheme):
  return {r["bits"]: r for r in results["rows"] if r["scheme"] == scheme}


def test_mnist_bits_quick(tmp_path, capsys):
  results = load_experiment("mnist_bits").main(["--quick", "--no-progress", "--out",
                                                str(tmp_path)])
  out = capsys.readouterr().out
  assert "per-channel symmetric" in out and "QAT 4-bit epoch 1/1" in out
  assert json.loads((tmp_path / "results.json").read_text()) == results
  assert results["data"]["train"] == 2000 and results["data"]["test"] == 1000
  assert len(results["float"]["epochs"]) == results["config"]["epochs"] == 3
  float_acc = results["float"]["accuracy"]
  assert float_acc > 0.8, "three float epochs on 2,000 MNIST digits should pass 80 %"
  for scheme in ("per-tensor affine", "per-tensor symmetric", "per-channel symmetric"):
    rows = _rows(results, scheme)
    assert set(rows) == {8, 4}
    # 6 dB per bit: four bits fewer must cost well over 15 dB of weight SQNR.
    assert rows[8]["weight_sqnr_db"] > rows[4]["weight_sqnr_db"] + 15
    assert abs(rows[8]["ptq_accuracy"] - float_acc) <= 0.01
    assert rows[4]["weight_bytes_packed"] < rows[8]["weight_bytes_packed"]
    assert (rows[4]["qat_accuracy"] is not None) == (scheme == "per-channel symmetric")
  assert _rows(results, "per-channel symmetric")[4]["qat_accuracy"] > 0.8


def test_mnist_bits_weight_transforms():
  """The pieces of the study on the stock MLP: fake-quantized kernels lie on their grid (and
  only kernels change), quantize_weights dequantizes to the same values, and the activation
  dot_general quantizes the layer inputs (a W-only forward differs from the W+A8 one)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  bits = load_experiment("mnist_bits")
  x = np.random.default_rng(1).uniform(size=(16, 784)).astype(np.float32)
  spec = bits.weight_spec(3, "per-channel symmetric")

  # Initialised as the study does (its eager programs are the study's); the pieces then in
  # one compiled program (eagerly each op would compile on its own).
  params = bits.FLOAT_MLP.init(jax.random.PRNGKey(0), x[:1])["params"]

  @jax.jit
  def pieces(params, x):
    return (bits.fake_quant_weights(params, spec), *bits.quantize_weights(params, spec),
            bits.FLOAT_MLP.apply({"params": params}, x), bits.A8_MLP.apply({"params": params}, x))

  fake, qarrays, dequantized, float_logits, a8_logits = pieces(params, x)
  assert [np.asarray(q.qvalue).shape for q in qarrays] == [(784, 100), (100, 100), (100, 10)]
  for layer in ("fc1", "fc2", "fc3"):
    np.testing.assert_array_equal(fake[layer]["bias"], params[layer]["bias"])
    kernel = np.asarray(fake[layer]["kernel"])
    assert max(len(np.unique(kernel[:, j])) for j in range(kernel.shape[1])) <= 2**3
    np.testing.assert_allclose(kernel, dequantized[layer]["kernel"], rtol=0, atol=1e-7)
  assert 0 < float(np.max(np.abs(np.asarray(a8_logits) - np.asarray(float_logits)))) < 0.1
  with pytest.raises(ValueError, match="scheme"):
    bits.weight_spec(8, "per-row")


@pytest.mark.slow
def test_mnist_bits_full(tmp_path):
  results = load_experiment("mnist_bits").main(["--no-progress", "--out", str(tmp_path),
                                                "--plot"])
  assert (tmp_path / "accuracy_vs_bits.png").stat().st_size > 0
  assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
  float_acc = results["float"]["accuracy"]
  per_channel = _rows(results, "per-channel symmetric")
  assert abs(per_channel[8]["ptq_accuracy"] - float_acc) <= 0.005
  assert per_channel[2]["qat_accuracy"] > per_channel[2]["ptq_accuracy"]
  for scheme in ("per-tensor affine", "per-tensor symmetric", "per-channel symmetric"):
    sqnr = [r["weight_sqnr_db"] for _, r in sorted(_rows(results, scheme).items())]
    assert sqnr == sorted(sqnr), f"{scheme}: SQNR must grow with the bit width"


@pytest.mark.slow
def test_bench_qat_smoke():
  """The QAT benchmark runs (tiny batch, one step, no timing claims) and its evidence checks
  see qjax's fake quantization: rounding in the forward pass, logits that differ from float,
  and a gradient for every parameter."""
  results = load_experiment("bench_qat").main(["--reps", "1", "--rounds", "1", "--models",
                                               "mlp,lenet5", "--batch", "4",
                                               "--min-round-seconds", "0", "--sync", "loss"])
  assert results["sync"] == "loss" and results["carry"] == "packed"
  rows = {(r["model"], r["variant"]): r for r in results["rows"]}
  assert all(r["ms_per_step"] > 0 for r in results["rows"])
  for model in ("mlp", "lenet5"):
    assert rows[(model, "float32")]["evidence"]["round_ops"] == 0
    qat = rows[(model, "qjax int8 QAT")]["evidence"]
    assert qat["round_ops"] > 0 and 0 < qat["rel_err_logits"] < 0.1
    assert qat["zero_grad_leaves"] == []
    # The int8-forward row: every contraction takes int8 (3 Dense; LeNet-5's 2 convs too).
    fwd = rows[(model, "qjax QAT int8 fwd")]["evidence"]
    assert fwd["int8_contractions"] == fwd["contractions"] == {"mlp": 3, "lenet5": 5}[model], fwd
    assert 0 < fwd["rel_err_logits"] < 0.1 and fwd["zero_grad_leaves"] == []
  # The observer states carried as a tree instead: the same checks hold.
  tree = load_experiment("bench_qat").main(["--reps", "1", "--rounds", "1", "--models", "mlp",
                                            "--batch", "4", "--min-round-seconds", "0",
                                            "--carry", "tree"])
  assert tree["carry"] == "tree"
  assert {r["variant"]: r["evidence"] for r in tree["rows"]} == {
      variant: row["evidence"] for (model, variant), row in rows.items() if model == "mlp"}
