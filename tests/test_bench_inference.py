"""The inference benchmark runs end to end (--quick): every row printed with finite ratios, and
its evidence columns see int8 contractions where the integer path runs. No timing claims."""

from __future__ import annotations

import contextlib
import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.experiments import load_experiment, user_promotion_rules  # noqa: F401

import qjax.nn as qnn
from qjax.integer import arith
from qjax.integer import kernels

pytest.importorskip("torch")  # the torch x86 rows are part of every case


@pytest.fixture(scope="module")
def quick():
  """The module, and the results and printed table of one `--quick` run."""
  bench = load_experiment("bench_inference")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    results = bench.main(["--quick"])
  return bench, results, out.getvalue()


@pytest.mark.slow
def test_quick_run_prints_every_row(quick):
  bench, results, out = quick
  lines = out.splitlines()
  for case in bench.QUICK_CASES:
    for variant in bench.VARIANTS:
      prefix = f"{case.model_name:<19} {case.batch:>5}  {variant:<{bench.VARIANT_WIDTH}}"
      matching = [line for line in lines if line.startswith(prefix)]
      assert len(matching) == 1, f"no single row {prefix!r} in:\n{out}"
      assert "skipped" not in matching[0], matching[0]
  assert not results["skipped"]
  assert len(results["rows"]) == len(bench.QUICK_CASES) * len(bench.VARIANTS)


@pytest.mark.slow
def test_quick_run_ratios_and_evidence(quick):
  """Ratios are finite and positive; the float32 apply has no int8 contraction; each int8
  apply runs every contraction in int8 in the optimised XLA program but LeNet-5's conv1 (one
  input channel: XLA's s32 convolution, see test_int8_conv_lowerings_stay_int8, where the
  native kernel's direct convolution does not run it) and, on XLA, the block's first
  depthwise convolution (16 channels: XLA rewrites it to s32), with logits
  close to float's but not equal, and "fbgemm"'s as far from float's as torch's (PyTorch's
  x86 arithmetic)."""
  _, results, _ = quick
  torch_err = {(r["model"], r["batch"]): r["rel_err"] for r in results["rows"]
               if r["variant"] == "torch x86 int8"}
  for row in results["rows"]:
    what = (row["model"], row["batch"], row["variant"])
    for key in ("ms", "x_float32", "x_torch"):
      assert math.isfinite(row[key]) and row[key] > 0, (what, key, row[key])
    if row["variant"] == "float32":
      assert row["x_float32"] == 1.0 and row["hlo_int8_contractions"] == 0, what
      assert row["hlo_contractions"] > 0 and row["compile_s"] > 0, what
    elif row["variant"].startswith("int8"):
      # LeNet-5's conv1 (one input channel) is XLA's s32 convolution unless the native
      # kernel's direct convolution runs it.
      direct = row["variant"].endswith("native)") and kernels.direct_conv(
          (5, 5, 1, 6), (1, 1), (1, 1), 1, kernels.resolve("native"))
      s32_convs = 1 if row["model"] == "lenet5" and not direct else 0
      if row["model"] == "block" and row["variant"].endswith("xla)"):
        s32_convs = 1
      assert row["hlo_int8_contractions"] == row["hlo_contractions"] - s32_convs > 0, what
      assert 0 < row["rel_err"] < 0.1, what
      if row["variant"].startswith("int8 (fbgemm"):
        reference = torch_err[(row["model"], row["batch"])]
        assert abs(row["rel_err"] - reference) <= 0.01 * reference, (what, reference)
    else:
      assert row["x_torch"] == 1.0 and 0 < row["rel_err"] < 0.1, what


@pytest.mark.parametrize("index", range(4), ids=["mlp_mnist", "lenet5", "mlp_square", "block"])
def test_models_and_torch_twins_compute_the_same_network(index):
  """The benchmarked models are experiments.models' (LeNet-5 on 32x32 inputs) and the grouped
  block, and each torch twin, before quantization, gives the float apply's logits on the same
  parameters (grouped convolutions and the flattening order included)."""
  import torch  # pylint: disable=import-outside-toplevel

  bench, models = load_experiment("bench_inference"), load_experiment("models")
  case = bench.QUICK_CASES[(0, 3, 4, 5)[index]]
  model = bench.quant_model(case, qnn.default_qconfig)
  assert type(model) is (bench.GroupedBlock if case.kind == "block"
                         else models.QUANT_MODELS[case.kind])
  if case.kind == "lenet5":
    assert case.input_shape == models.INPUT_SHAPES["lenet5"] == (32, 32, 1)
  x = bench.pixels((3,) + case.input_shape, 0)
  params = jax.jit(lambda x: model.init(jax.random.key(0), x, mode="float"))(x)["params"]
  expected = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, mode="float"))(
      params, x))
  twin, fuse = bench._torch_model(case.kind, case.dims, params)
  assert {name for pair in fuse for name in pair} <= {n for n, _ in twin.named_children()}
  with torch.inference_mode():
    got = twin(bench._to_torch(x)).numpy()
  assert got.shape == expected.shape == (3, case.dims[-1] if case.kind == "mlp" else 10)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_hlo_census_reads_operand_types():
  """The evidence column's parser: an int8 dot counts, the same dot in float32 does not."""
  bench = load_experiment("bench_inference")
  a8, b8 = jnp.ones((4, 8), jnp.int8), jnp.ones((8, 3), jnp.int8)
  int8_dot = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.int32))
  float_dot = jax.jit(lambda a, b: a @ b)
  assert bench.hlo_int8_contractions(int8_dot.lower(a8, b8).compile().as_text()) == (1, 1)
  a, b = a8.astype(jnp.float32), b8.astype(jnp.float32)
  assert bench.hlo_int8_contractions(float_dot.lower(a, b).compile().as_text()) == (0, 1)
  if kernels.available():  # a native GEMM call counts, int8 by its activations and weights
    native = jax.jit(lambda a, b: kernels.matmul(a, b, kernel="native"))
    assert bench.hlo_int8_contractions(native.lower(a8, b8.T).compile().as_text()) == (1, 1)
    packed = jax.jit(lambda a, b: kernels.matmul(a, kernels.pack(b), kernel="native"))
    assert bench.hlo_int8_contractions(packed.lower(a8, b8.T).compile().as_text()) == (1, 1)


def _compiled_conv_census(x_shape, kernel_shape, groups=1) -> tuple[int, int]:
  """(int8 dot / convolution ops, all of them) in the optimised XLA program of one
  qjax.integer.arith.conv, by the benchmark's census."""
  bench = load_experiment("bench_inference")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(-128, 128, x_shape), jnp.int8)
  kernel = jnp.asarray(rng.integers(-127, 128, kernel_shape), jnp.int8)
  conv = jax.jit(lambda x, k: arith.conv(x, k, strides=(1, 1), padding=((0, 0), (0, 0)),
                                         dilation=(1, 1), feature_group_count=groups,
                                         pad_value=jnp.int32(0)))
  return bench.hlo_int8_contractions(conv.lower(x, kernel).compile().as_text())


def test_int8_conv_compiles_to_int8_contractions():
  """LeNet-5's second convolution (6 -> 16 channels, the im2col path) through
  qjax.integer.arith.conv: every dot / convolution of the optimised XLA program takes int8
  operands (the kernel enters the GEMM untransposed; transposed, XLA rewrote it into an int32
  dot)."""
  int8_ops, total = _compiled_conv_census((8, 14, 14, 6), (5, 5, 6, 16))
  assert total == 1 and int8_ops == total, (int8_ops, total)


# XLA:CPU (jaxlib 0.10.2) keeps a direct int8 convolution in s8 only when it has more than 16
# input or output channels; otherwise it converts the operands to s32 (measured over Cin, Cout
# in 1..64). qjax.integer.arith.conv's im2col GEMM (2..15 input channels, or <= 16 in and out;
# no groups) is an s8 dot for any Cout > 1. The expected failures are not strict: which
# lowering XLA picks may depend on the CPU's features, so an unexpected pass is reported, not
# failed.
_S32_REASON = ("XLA:CPU converts a direct int8 convolution with at most 16 input and output "
               "channels (or small groups) to an s32 convolution")
_CONV_CENSUS = (
    pytest.param((4, 12, 12, 2), (3, 3, 2, 4), 1, id="im2col_cin2_cout4"),
    pytest.param((4, 12, 12, 15), (3, 3, 15, 64), 1, id="im2col_cin15_cout64"),
    pytest.param((4, 12, 12, 1), (3, 3, 1, 24), 1, id="direct_cin1_cout24"),
    pytest.param((4, 12, 12, 17), (3, 3, 17, 4), 1, id="direct_cin17_cout4"),
    pytest.param((4, 12, 12, 64), (3, 3, 64, 64), 1, id="direct_cin64_cout64"),
    pytest.param((4, 12, 12, 64), (3, 3, 16, 64), 4, id="direct_groups4_64"),
    pytest.param((4, 12, 12, 1), (3, 3, 1, 6), 1, id="direct_cin1_cout6", marks=pytest.mark.xfail(
        strict=False, raises=AssertionError, reason=(
            _S32_REASON + "; for one input channel the s32 convolution is still the faster "
            "lowering (LeNet-5's conv1 at batch 256: 0.6 ms, im2col + int8 GEMM 3.4 ms, "
            "float32 4.7 ms)"))),
    pytest.param((4, 12, 12, 16), (3, 3, 16, 12), 1, id="im2col_cin16_cout12"),
    pytest.param((4, 12, 12, 6), (3, 3, 2, 6), 3, id="direct_groups3_6", marks=pytest.mark.xfail(
        strict=False, raises=AssertionError, reason=_S32_REASON)),
)


@pytest.mark.parametrize("x_shape, kernel_shape, groups", _CONV_CENSUS)
def test_int8_conv_lowerings_stay_int8(x_shape, kernel_shape, groups):
  """Each lowering of qjax.integer.arith.conv, compiled: its one contraction takes s8 operands."""
  int8_ops, total = _compiled_conv_census(x_shape, kernel_shape, groups)
  assert total == 1 and int8_ops == 1, (int8_ops, total)


def test_dispatch_setting_is_set_before_jax_starts_only():
  """JAX reads its CPU dispatch setting when it creates the CPU client: once it exists, the
  benchmark leaves the setting alone and records it as unknown (None)."""
  bench = load_experiment("bench_inference")
  jax.devices()
  before = jax.config.read("jax_cpu_enable_async_dispatch")
  assert bench.set_async_dispatch(not before) is None
  assert jax.config.read("jax_cpu_enable_async_dispatch") == before


def test_models_option_filters_and_refuses_unknown_kinds(capsys):
  """--models names the kinds of model to run; an unknown kind is refused by name."""
  bench = load_experiment("bench_inference")
  with pytest.raises(SystemExit):
    bench.main(["--quick", "--models", "block,resnet"])
  assert "--models takes kinds of ['mlp', 'lenet5', 'block']" in capsys.readouterr().err
