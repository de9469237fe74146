"""The README's quickstart runs as written and prints what it claims."""

import functools
import pathlib
import re

import jax
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(capsys):
  code = re.search(r"## Quickstart\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    exec(compile(code, "README-quickstart", "exec"), {})  # pylint: disable=exec-used
  assert capsys.readouterr().out.strip() == "int8 (4,) 72"


def test_commands_match_ci():
  text = README.read_text()
  ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert ci.replace("pip install -q", "pip install") in text


def test_flax_example_runs(capsys):
  code = re.search(r"## Calibration and QAT with Flax\n\n```python\n(.*?)```", README.read_text(),
                   re.S).group(1)
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    exec(compile(code, "README-flax", "exec"), {})  # pylint: disable=exec-used
  assert capsys.readouterr().out.strip() == "['output', 'weight'] int32"


def test_integer_example_runs(capsys):
  code = re.search(r"## Integer inference\n\n```python\n(.*?)```", README.read_text(),
                   re.S).group(1)
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    exec(compile(code, "README-int8", "exec"), {})  # pylint: disable=exec-used
  assert capsys.readouterr().out.strip().splitlines() == ["int8 1", "True"]


def _snippet(heading: str) -> str:
  """The first python block after the paragraph that starts with `heading`."""
  return re.search(re.escape(heading) + r".*?```python\n(.*?)```", README.read_text(),
                   re.S).group(1)


@functools.cache
def _residual_and_scan() -> dict:
  """The residual block and the scanned RNN of the README, each snippet executed as written in
  one namespace (as the README reads, after the integer example's imports; the snippets take
  any `qconfig`: PyTorch's min/max `default_qconfig` here, histogram observers are tested
  elsewhere), then calibrated, converted and run in int8 inside one model, so that init, the
  calibration step, the conversion and the int8 forward each compile once for both."""
  import flax.linen as nn
  import jax.numpy as jnp

  import qjax
  import qjax.nn as qnn
  ns = {"jax": jax, "jnp": jnp, "nn": nn, "qjax": qjax, "qnn": qnn,
        "qconfig": qnn.default_qconfig}
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    exec(compile(_snippet("Residual networks."), "README-residual", "exec"), ns)  # noqa: S102
    exec(compile(_snippet("Loops over time."), "README-scan", "exec"), ns)  # noqa: S102
    block, rnn, qconfig = ns["Block"], ns["RNN"], ns["qconfig"]

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x, xs, mode="float"):
        x = qnn.Quantize(qconfig)(x, mode=mode)
        x = qnn.QuantConv(16, (3, 3), qconfig=qconfig)(x, mode=mode)
        return (qnn.Dequantize()(block()(x, mode=mode), mode=mode),
                rnn(name="rnn")(xs, mode=mode))

    # Inputs and weights from NumPy (jax.random would compile a sampler per shape), init
    # compiled for the observers' initial states alone, the int8 forward compiled whole (op by
    # op every eager op compiles on its own; the modules' eager int8 forms have tests of their
    # own).
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.normal(size=(2, 8, 8, 3)).astype(np.float32))
    xs = jax.device_put(rng.normal(size=(5, 2, 3)).astype(np.float32))
    model = Net()
    params = jax.tree_util.tree_map(
        lambda s: jax.device_put((0.3 * rng.normal(size=s.shape)).astype(s.dtype)),
        jax.eval_shape(model.init, jax.random.key(1), x, xs)["params"])
    stats = jax.jit(lambda key, x, xs: model.init(key, x, xs)["quant_stats"])(
        jax.random.key(1), x, xs)
    variables = qnn.calibrate(model, {"params": params, "quant_stats": stats}, [(x, xs)])
    y, ys = jax.jit(lambda v, x, xs: model.apply(v, x, xs, mode="int8"))(
        qjax.convert(model, variables, x, xs), x, xs)
  return {"quant_stats": variables["quant_stats"], "y": np.asarray(y), "ys": np.asarray(ys)}


def test_residual_snippet_converts_and_runs():
  y = _residual_and_scan()["y"]
  assert y.shape == (2, 24) and np.all(np.isfinite(y))


def test_scan_snippet_converts_and_runs():
  run = _residual_and_scan()
  assert int(run["quant_stats"]["rnn"]["ScanCell_0"]["Quantize_0"]["count"]) == 5
  assert run["ys"].shape == (5, 2, 32) and np.all(np.isfinite(run["ys"]))


def test_research_quantizers_snippet_runs(capsys):
  code = _snippet("## Research quantizers (`qjax.quantizers`)")
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    exec(compile(code, "README-research", "exec"), {})  # noqa: S102
  assert capsys.readouterr().out.strip() == "Int8Dense (64, 10)"
