"""The README's quickstart runs as written and prints what it claims."""

import pathlib
import re

import jax

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


def _namespace() -> dict:
  import flax.linen as nn
  import jax.numpy as jnp

  import qjax
  import qjax.nn as qnn
  return {"jax": jax, "jnp": jnp, "nn": nn, "qjax": qjax, "qnn": qnn,
          "qconfig": qnn.get_default_qconfig("x86")}


def test_residual_snippet_converts_and_runs():
  import flax.linen as nn
  import numpy as np

  ns = _namespace()
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    exec(compile(_snippet("Residual networks."), "README-residual", "exec"), ns)  # noqa: S102
    qnn, block = ns["qnn"], ns["Block"]

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x, mode="float"):
        x = qnn.Quantize(ns["qconfig"])(x, mode=mode)
        x = qnn.QuantConv(16, (3, 3), qconfig=ns["qconfig"])(x, mode=mode)
        return qnn.Dequantize()(block()(x, mode=mode), mode=mode)

    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    # init and the int8 forward compiled whole: op by op, every eager op compiles on its own
    # (the modules' eager int8 forms have tests of their own).
    variables = qnn.calibrate(Net(), jax.jit(Net().init)(jax.random.key(1), x), [x])
    int_vars = ns["qjax"].convert(Net(), variables, x)
    y = jax.jit(lambda v, x: Net().apply(v, x, mode="int8"))(int_vars, x)
  assert y.shape == (2, 24) and np.all(np.isfinite(y))


def test_scan_snippet_converts_and_runs():
  import numpy as np

  ns = _namespace()
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    exec(compile(_snippet("Loops over time."), "README-scan", "exec"), ns)  # noqa: S102
    model, qnn = ns["RNN"](), ns["qnn"]
    xs = jax.random.normal(jax.random.key(0), (5, 2, 3))
    variables = qnn.calibrate(model, jax.jit(model.init)(jax.random.key(1), xs), [xs])
    assert int(variables["quant_stats"]["ScanCell_0"]["Quantize_0"]["count"]) == 5
    ys = jax.jit(lambda v, xs: model.apply(v, xs, mode="int8"))(
        ns["qjax"].convert(model, variables, xs), xs)
  assert ys.shape == (5, 2, 32) and np.all(np.isfinite(ys))


def test_research_quantizers_snippet_runs(capsys):
  code = _snippet("## Research quantizers (`qjax.quantizers`)")
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    exec(compile(code, "README-research", "exec"), {})  # noqa: S102
  assert capsys.readouterr().out.strip() == "Int8Dense (64, 10)"
