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
