"""BatchNorm folding (qjax.fuse) and the folded-BatchNorm QAT layers (qjax.nn.fused).

* fold_batch_norm: the folded layer equals the layer followed by Flax's BatchNorm in
  inference mode (Dense, Conv with stride / padding, with and without bias, BatchNorms
  without scale or offset), as a property over shapes and values; it reproduces a NumPy
  float32 reference of PyTorch's operation order bit for bit, with and without jit.
* fold_batch_norms: a small Flax model with BatchNorms, folded, loads into the same model
  built without them and gives the same outputs; errors name the missing pytree path.
* QuantConvBN / QuantDenseBN: variable layout, float mode == nn.Conv + nn.BatchNorm, running
  averages (PyTorch's unbiased variance), calibration observes W * s, QAT in eval is the
  folded layer that `folded_kernel_and_bias` describes, misuse errors.
"""

from __future__ import annotations

import functools

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

import qjax.nn as qnn
from qjax import QuantSpec
from qjax import observers as obs
from qjax.fuse import fold_batch_norm, fold_batch_norms, folded_kernel_and_bias
from qjax.nn.fused import QuantConvBN, QuantDenseBN

F32 = np.float32
QAT = qnn.get_default_qat_qconfig("x86")


def _bn_variables(rng, c, *, use_scale=True, use_bias=True):
  """Random BatchNorm params and running statistics for c channels."""
  params = {}
  if use_scale:
    params["scale"] = rng.uniform(-2, 2, c).astype(F32)
  if use_bias:
    params["bias"] = rng.normal(size=c).astype(F32)
  stats = {"mean": rng.normal(size=c).astype(F32), "var": rng.uniform(0.05, 4, c).astype(F32)}
  return params, stats


def _layer(kind, features, use_bias, strides=1, padding="SAME", kernel_size=(3, 3)):
  if kind == "dense":
    return nn.Dense(features, use_bias=use_bias)
  return nn.Conv(features, kernel_size, strides=strides, padding=padding, use_bias=use_bias)


def _layer_then_bn(kind, x, layer_params, bn_params, bn_stats, *, use_bias, use_scale,
                   bn_bias, strides=1, padding="SAME", kernel_size=(3, 3), epsilon=1e-5):
  """Flax's layer followed by Flax's BatchNorm(use_running_average=True)."""
  y = _layer(kind, bn_stats["mean"].shape[0], use_bias, strides, padding,
             kernel_size).apply({"params": layer_params}, x)
  bn = nn.BatchNorm(use_running_average=True, use_scale=use_scale, use_bias=bn_bias,
                    epsilon=epsilon)
  return bn.apply({"params": bn_params, "batch_stats": bn_stats}, y)


def _folded_layer(kind, x, kernel, bias, *, strides=1, padding="SAME", kernel_size=(3, 3)):
  return _layer(kind, kernel.shape[-1], True, strides, padding, kernel_size).apply(
      {"params": {"kernel": kernel, "bias": bias}}, x)


def _init_with_numpy_kernels(init, *args, seed=0):
  """init(*args)'s variables with every "kernel" drawn in NumPy (lecun-normal scale).

  The compiled init computes the other variables alone: the kernels' random initializers
  would take most of its compile time, and no test here is about them (their shapes come from
  init, traced)."""
  shapes = jax.eval_shape(init, *args)
  is_kernel = lambda path: getattr(path[-1], "key", None) == "kernel"  # noqa: E731
  rest = jax.jit(lambda *a: jax.tree_util.tree_map_with_path(
      lambda path, v: None if is_kernel(path) else v, init(*a)))(*args)
  values = {jax.tree_util.keystr(path): v
            for path, v in jax.tree_util.tree_flatten_with_path(rest)[0]}
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    if not is_kernel(path):
      return values[jax.tree_util.keystr(path)]
    fan_in = int(np.prod(s.shape[:-1]))
    return jax.device_put((rng.normal(size=s.shape) / np.sqrt(fan_in)).astype(s.dtype))

  return jax.tree_util.tree_map_with_path(leaf, shapes)


# ------------------------------------------------------------------------------------------
# fold_batch_norm against Flax's BatchNorm.

CASES = {
    "dense": dict(kind="dense"),
    "dense_no_bias": dict(kind="dense", use_bias=False),
    "conv": dict(kind="conv"),
    "conv_stride2_valid": dict(kind="conv", strides=2, padding="VALID"),
    "conv_pad1_no_bias": dict(kind="conv", strides=(2, 1), padding=((1, 1), (1, 1)),
                              use_bias=False),
    "conv_no_bn_scale": dict(kind="conv", use_scale=False),
    "conv_no_bn_offset": dict(kind="conv", bn_bias=False),
    "dense_no_bn_affine": dict(kind="dense", use_scale=False, bn_bias=False, use_bias=False),
}


@functools.partial(jax.jit, static_argnames=("kind", "strides", "padding", "kernel_size"))
def _fold_and_reference(x, layer_params, bn_params, bn_stats, *, kind, strides, padding,
                        kernel_size):
  """(folded layer's output, layer then Flax's BatchNorm), both from one compiled program."""
  expected = _layer_then_bn(kind, x, layer_params, bn_params, bn_stats,
                            use_bias="bias" in layer_params, use_scale="scale" in bn_params,
                            bn_bias="bias" in bn_params, strides=strides, padding=padding,
                            kernel_size=kernel_size)
  kernel, bias = fold_batch_norm(layer_params["kernel"], layer_params.get("bias"),
                                 scale=bn_params.get("scale"), offset=bn_params.get("bias"),
                                 mean=bn_stats["mean"], var=bn_stats["var"])
  got = _folded_layer(kind, x, kernel, bias, strides=strides, padding=padding,
                      kernel_size=kernel_size)
  return got, expected


def _fold_case(seed, kind, use_bias=True, use_scale=True, bn_bias=True, strides=1,
               padding="SAME", cin=3, cout=5, kernel_size=(3, 3), spatial=(7, 6), batch=4):
  rng = np.random.default_rng(seed)
  shape = (batch, cin) if kind == "dense" else (batch, *spatial, cin)
  x = rng.normal(size=shape).astype(F32)
  layer_params = {"kernel": rng.normal(size=((cin,) if kind == "dense" else (*kernel_size, cin))
                                       + (cout,)).astype(F32)}
  if use_bias:
    layer_params["bias"] = rng.normal(size=cout).astype(F32)
  bn_params, bn_stats = _bn_variables(rng, cout, use_scale=use_scale, use_bias=bn_bias)
  got, expected = _fold_and_reference(x, layer_params, bn_params, bn_stats, kind=kind,
                                      strides=strides, padding=padding,
                                      kernel_size=tuple(kernel_size))
  return np.asarray(got), np.asarray(expected)


def _assert_float_close(got, expected):
  """Equal up to float32 rounding of the sums (relative to the output's magnitude)."""
  assert got.shape == expected.shape
  scale = max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5 * scale)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fold_equals_layer_then_flax_batch_norm(case):
  got, expected = _fold_case(0, **case)
  _assert_float_close(got, expected)


_FOLD_SHAPES = {
    "seed": st.integers(0, 2**31 - 1), "kind": st.sampled_from(["dense", "conv"]),
    "cin": st.integers(1, 6), "cout": st.integers(1, 7), "kh": st.integers(1, 3),
    "kw": st.integers(1, 3), "stride": st.integers(1, 2), "use_bias": st.booleans(),
    "use_scale": st.booleans(), "bn_bias": st.booleans(),
    "padding": st.sampled_from(["SAME", "VALID"])}


def _check_fold(seed, kind, cin, cout, kh, kw, stride, use_bias, use_scale, bn_bias, padding):
  """For any shapes and values, conv(x, W') + b' == BatchNorm(conv(x, W) + b)."""
  got, expected = _fold_case(seed, kind, use_bias=use_bias, use_scale=use_scale,
                             bn_bias=bn_bias, strides=stride, padding=padding, cin=cin,
                             cout=cout, kernel_size=(kh, kw), spatial=(5, 4), batch=3)
  _assert_float_close(got, expected)


# Every example compiles its shapes: a few by default, more with -m slow.
@settings(max_examples=5, deadline=None)
@given(**_FOLD_SHAPES)
def test_fold_property(**case):
  _check_fold(**case)


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(**_FOLD_SHAPES)
def test_fold_property_more_examples(**case):
  _check_fold(**case)


@pytest.mark.parametrize("shape", [(48, 64), (3, 3, 16, 64)])
def test_identity_batch_norm_changes_nothing(shape):
  """mean 0, var 1, gamma 1, beta 0, eps 0: the kernel and bias come back bit for bit."""
  rng = np.random.default_rng(1)
  kernel, bias = rng.normal(size=shape).astype(F32), rng.normal(size=shape[-1]).astype(F32)
  c = shape[-1]
  k, b = fold_batch_norm(kernel, bias, scale=np.ones(c, F32), offset=np.zeros(c, F32),
                         mean=np.zeros(c, F32), var=np.ones(c, F32), epsilon=0.0)
  np.testing.assert_array_equal(k, kernel)
  np.testing.assert_array_equal(b, bias)


def _numpy_fold(kernel, bias, gamma, beta, mean, var, eps):
  """PyTorch's fuse_{conv,linear}_bn_weights in NumPy float32, one rounding per operation."""
  c = kernel.shape[-1]
  bias = np.zeros(c, F32) if bias is None else bias
  gamma = np.ones(c, F32) if gamma is None else gamma
  beta = np.zeros(c, F32) if beta is None else beta
  inv_std = F32(1) / np.sqrt(var + F32(eps))
  factor = gamma * inv_std
  if kernel.ndim == 2:
    new_bias = (bias - mean) * factor + beta
  else:
    new_bias = ((bias - mean) * inv_std) * gamma + beta
  return kernel * factor, new_bias


class FoldVariantsTest(chex.TestCase):
  """Jitted and eager folding equal the NumPy reference bit for bit (XLA would otherwise
  rewrite 1 / sqrt and contract multiply-adds)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("dense", (48, 64), True, True), ("dense_bare", (48, 64), False, False),
      ("conv1d", (5, 16, 64), True, True), ("conv2d", (3, 3, 16, 64), True, False),
      ("conv2d_no_bias", (3, 3, 16, 64), False, True))
  def test_fold_batch_norm_matches_reference(self, shape, use_bias, affine):
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=shape).astype(F32)
    bias = rng.normal(size=shape[-1]).astype(F32) if use_bias else None
    bn, stats = _bn_variables(rng, shape[-1], use_scale=affine, use_bias=affine)
    fold = self.variant(functools.partial(fold_batch_norm, epsilon=1e-3))
    k, b = fold(kernel, bias, scale=bn.get("scale"), offset=bn.get("bias"), **stats)
    ref_k, ref_b = _numpy_fold(kernel, bias, bn.get("scale"), bn.get("bias"), stats["mean"],
                               stats["var"], 1e-3)
    assert k.dtype == jnp.float32 and b.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(k).view(np.uint32), ref_k.view(np.uint32))
    np.testing.assert_array_equal(np.asarray(b).view(np.uint32), ref_b.view(np.uint32))

  @chex.variants(with_jit=True, without_jit=True)
  def test_folded_kernel_and_bias_matches_reference(self):
    rng = np.random.default_rng(3)
    params = {"kernel": rng.normal(size=(3, 3, 16, 64)).astype(F32),
              "bias": rng.normal(size=64).astype(F32),
              "bn_scale": rng.uniform(0.5, 2, 64).astype(F32),
              "bn_bias": rng.normal(size=64).astype(F32)}
    _, stats = _bn_variables(rng, 64)
    k, b = self.variant(folded_kernel_and_bias)(params, stats)
    ref_k, ref_b = _numpy_fold(params["kernel"], params["bias"], params["bn_scale"],
                               params["bn_bias"], stats["mean"], stats["var"], 1e-5)
    np.testing.assert_array_equal(np.asarray(k).view(np.uint32), ref_k.view(np.uint32))
    np.testing.assert_array_equal(np.asarray(b).view(np.uint32), ref_b.view(np.uint32))


def test_fold_keeps_dtypes():
  kernel = jax.ShapeDtypeStruct((4, 3), jnp.bfloat16)
  k, b = jax.eval_shape(
      lambda kernel: fold_batch_norm(kernel, None, scale=None, offset=None,
                                     mean=np.zeros(3, F32), var=np.ones(3, F32)), kernel)
  assert k.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mean=np.zeros(4, F32)), ValueError, r"mean has shape \(4,\).*\(3, 3, 2, 5\).*\(5,\)"),
    (dict(bias=np.zeros((1, 5), F32)), ValueError, r"bias has shape \(1, 5\)"),
    (dict(kernel=np.ones(5, F32)), ValueError, r"rank >= 2; got shape \(5,\)"),
    (dict(kernel=np.ones((2, 5), np.int32)), TypeError, "kernel must be a floating-point"),
    (dict(var=-np.ones(5, F32)), ValueError, "var must be >= 0"),
    (dict(var=np.zeros(5, F32), epsilon=0.0), ValueError, r"var \+ epsilon must be > 0"),
    (dict(epsilon=-1e-5), ValueError, "epsilon must be >= 0"),
    (dict(epsilon="1e-5"), TypeError, "epsilon must be a Python float"),
])
def test_fold_batch_norm_errors(kwargs, error, match):
  args = dict(kernel=np.ones((3, 3, 2, 5), F32), bias=None, scale=None, offset=None,
              mean=np.zeros(5, F32), var=np.ones(5, F32))
  args.update(kwargs)
  kernel, bias = args.pop("kernel"), args.pop("bias")
  with pytest.raises(error, match=match):
    fold_batch_norm(kernel, bias, **args)


# ------------------------------------------------------------------------------------------
# fold_batch_norms on a Flax model.


class Block(nn.Module):
  """A nested conv + BatchNorm without scale (use_scale=False)."""

  fold_bn: bool = False

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Conv(6, (3, 3), padding=((1, 1), (1, 1)), use_bias=True, name="conv")(x)
    if not self.fold_bn:
      x = nn.BatchNorm(use_running_average=not train, use_scale=False, name="bn")(x)
    return nn.relu(x)


class Net(nn.Module):
  """conv1 (no bias) + bn1 + relu, block/{conv, bn}, fc + bn_fc (no offset). With fold_bn the
  BatchNorms are gone and every folded layer has a bias."""

  fold_bn: bool = False

  @nn.compact
  def __call__(self, x, *, train=False):
    x = nn.Conv(4, (3, 3), strides=2, use_bias=self.fold_bn, name="conv1")(x)
    if not self.fold_bn:
      x = nn.BatchNorm(use_running_average=not train, name="bn1")(x)
    x = Block(self.fold_bn, name="block")(nn.relu(x), train=train)
    x = nn.Dense(5, name="fc")(x.reshape((x.shape[0], -1)))
    if not self.fold_bn:
      x = nn.BatchNorm(use_running_average=not train, use_bias=False, name="bn_fc")(x)
    return nn.Dense(3, name="head")(x)


PAIRS = [("conv1", "bn1"), ("block/conv", "block/bn", {"use_scale": False}),
         ("fc", "bn_fc", {"use_bias": False})]


@functools.lru_cache(maxsize=None)
def _trained_net():
  """Net's variables after a few training batches, with random BatchNorm affine params."""
  rng = np.random.default_rng(4)
  model = Net()
  x = jax.device_put(rng.normal(size=(8, 8, 8, 3)).astype(F32))
  variables = _init_with_numpy_kernels(model.init, jax.random.key(0), x)
  step = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
  for _ in range(3):
    batch = jax.device_put((rng.normal(size=(8, 8, 8, 3)) * 2 + 0.5).astype(F32))
    _, updates = step(variables, batch)
    variables = {**variables, **updates}
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: (jax.device_put(rng.uniform(0.5, 2, v.shape).astype(F32))
                       if path[-1].key == "scale" else v), variables["params"])
  params["bn1"]["bias"] = jax.device_put(rng.normal(size=4).astype(F32))
  return {**variables, "params": params}, x


def test_fold_batch_norms_model_gives_same_outputs():
  variables, x = _trained_net()
  before = jax.tree_util.tree_map(np.asarray, variables)
  folded = fold_batch_norms(variables, PAIRS)
  fused = Net(fold_bn=True)
  # It loads into the model built without BatchNorms: same tree, same shapes.
  expected = jax.eval_shape(lambda: fused.init(jax.random.key(0), x))
  chex.assert_trees_all_equal_shapes_and_dtypes(folded, expected)
  assert "batch_stats" not in folded
  got, want = jax.jit(lambda folded, variables, x: (fused.apply(folded, x),
                                                   Net().apply(variables, x)))(
                                                       folded, variables, x)
  _assert_float_close(np.asarray(got), np.asarray(want))
  # The input is not modified.
  chex.assert_trees_all_equal(jax.tree_util.tree_map(np.asarray, variables), before)


def test_fold_batch_norms_partial_and_other_collections():
  """Folding one pair keeps the other BatchNorms and any other collection as they are."""
  variables, _ = _trained_net()
  extra = {"conv1": {"note": jnp.ones(2)}}
  frozen = flax.core.freeze({**variables, "extra": extra})
  folded = fold_batch_norms(frozen, [("block/conv", "block/bn", 1e-5)], use_scale=False)
  assert type(folded) is dict and type(folded["params"]["block"]) is dict
  assert set(folded["batch_stats"]) == {"bn1", "bn_fc"}
  assert set(folded["params"]["block"]) == {"conv"}
  assert folded["extra"] == extra
  chex.assert_trees_all_equal(folded["params"]["bn1"], variables["params"]["bn1"])


def test_fold_batch_norms_uses_the_pair_epsilon():
  variables, _ = _trained_net()
  a = fold_batch_norms(variables, [("conv1", "bn1", 0.5)])
  b = fold_batch_norms(variables, [("conv1", "bn1")], epsilon=0.5)
  c = fold_batch_norms(variables, [("conv1", "bn1")])
  chex.assert_trees_all_equal(a, b)
  assert not np.allclose(a["params"]["conv1"]["kernel"], c["params"]["conv1"]["kernel"])


@pytest.mark.parametrize("pairs, error, match", [
    ([("conv9", "bn1")], ValueError, r"no 'params/conv9/kernel'.*block/conv \(bias, kernel\)"),
    ([("conv1", "block/bn2")], ValueError, r"no 'batch_stats/block/bn2/mean'"),
    ([("block", "bn1")], ValueError, r"no 'params/block/kernel'"),
    ([("conv1", "bn1"), ("fc", "bn1")], ValueError, r"\['bn1'\] named more than once"),
    ([("conv1",)], TypeError, r"\(layer_path, bn_path\)"),
    (["conv1/bn1"], TypeError, r"\(layer_path, bn_path\)"),
    ("conv1", TypeError, "pairs must be a sequence"),
    ([("conv1", "bn_fc", {"use_bias": False})], ValueError,
     r"params/bn_fc/scale has shape \(5,\), but params/conv1/kernel has shape \(3, 3, 3, 4\)"),
    ([("conv1", "bn1", -1.0)], ValueError, "epsilon must be >= 0"),
])
def test_fold_batch_norms_errors(pairs, error, match):
  variables, _ = _trained_net()
  with pytest.raises(error, match=match):
    fold_batch_norms(variables, pairs)


def test_fold_batch_norms_missing_scale_or_bias_raises_naming_the_path():
  """A BatchNorm without gamma / beta must be declared (use_scale / use_bias = False)."""
  variables, _ = _trained_net()
  with pytest.raises(ValueError, match=r"no 'params/block/bn/scale' in variables, but the pair "
                     r"says the BatchNorm has one \(use_scale=True, the default\)\. A Flax "
                     r"BatchNorm built with use_scale=False has none: say so with "
                     r"use_scale=False .*the pair \(layer, 'block/bn', \{'use_scale': False\}\)"):
    fold_batch_norms(variables, [("block/conv", "block/bn")])
  with pytest.raises(ValueError, match=r"no 'params/bn_fc/bias' .*\(use_bias=True"):
    fold_batch_norms(variables, [("fc", "bn_fc")])
  # A lost gamma is an error, not gamma = 1.
  params = {**variables["params"], "bn1": {"bias": variables["params"]["bn1"]["bias"]}}
  with pytest.raises(ValueError, match=r"no 'params/bn1/scale'"):
    fold_batch_norms({**variables, "params": params}, [("conv1", "bn1")])


def test_fold_batch_norms_use_scale_and_use_bias():
  variables, _ = _trained_net()
  per_pair = fold_batch_norms(variables, [("block/conv", "block/bn", {"use_scale": False})])
  keyword = fold_batch_norms(variables, [("block/conv", "block/bn")], use_scale=False)
  chex.assert_trees_all_equal(per_pair, keyword)
  # The pair's dict overrides the call's defaults, epsilon included.
  a = fold_batch_norms(variables, [("fc", "bn_fc", {"use_bias": False, "epsilon": 0.5})])
  b = fold_batch_norms(variables, [("fc", "bn_fc")], use_bias=False, epsilon=0.5)
  chex.assert_trees_all_equal(a, b)
  # Declaring no scale where there is one would drop it: refused.
  with pytest.raises(ValueError, match=r"'params/bn1/scale' is in variables, but the pair says "
                     r"the BatchNorm has use_scale=False; folding would drop it"):
    fold_batch_norms(variables, [("conv1", "bn1")], use_scale=False)
  with pytest.raises(ValueError, match=r"'params/bn1/bias' is in variables.*use_bias=False"):
    fold_batch_norms(variables, [("conv1", "bn1", {"use_bias": False})])
  with pytest.raises(TypeError, match=r"unknown BatchNorm field\(s\) \['scale'\]"):
    fold_batch_norms(variables, [("conv1", "bn1", {"scale": False})])
  with pytest.raises(TypeError, match=r"use_scale must be True or False"):
    fold_batch_norms(variables, [("conv1", "bn1")], use_scale="no")


def test_fold_batch_norms_missing_collection():
  variables, _ = _trained_net()
  with pytest.raises(ValueError, match=r"no 'batch_stats' collection \(collections: \['params'\]"):
    fold_batch_norms({"params": variables["params"]}, PAIRS)


def test_folded_kernel_and_bias_names_missing_entries():
  with pytest.raises(ValueError, match=r"params has no \['bn_scale', 'bn_bias'\]"):
    folded_kernel_and_bias({"kernel": np.ones((2, 3), F32)},
                           {"mean": np.zeros(3, F32), "var": np.ones(3, F32)})
  with pytest.raises(ValueError, match=r"batch_stats has no \['var'\]"):
    folded_kernel_and_bias({"kernel": np.ones((2, 3), F32), "bn_scale": np.ones(3, F32),
                            "bn_bias": np.zeros(3, F32)}, {"mean": np.zeros(3, F32)})


# ------------------------------------------------------------------------------------------
# QuantConvBN / QuantDenseBN.

RNG = np.random.default_rng(5)
X_IMG = jax.device_put(RNG.normal(size=(4, 9, 9, 3)).astype(F32))
X_VEC = jax.device_put(RNG.normal(size=(12, 7)).astype(F32))


def _conv_bn(**kwargs):
  return QuantConvBN(6, (3, 3), strides=2, padding=((1, 1), (1, 1)), qconfig=QAT, **kwargs)


@functools.cache
def _init(use_bias=False, activation=None, train=False, mode="qat"):
  """_conv_bn(...).init on X_IMG (kernel from NumPy), computed once per signature and shared
  by the tests."""
  kwargs = {} if activation is None else {"activation": activation}
  init = functools.partial(_conv_bn(use_bias=use_bias, **kwargs).init, train=train, mode=mode)
  return _init_with_numpy_kernels(init, jax.random.key(0), X_IMG)


def _randomised(variables, seed=6):
  """Variables with random BatchNorm affine params and running statistics."""
  rng = np.random.default_rng(seed)
  params = dict(variables["params"])
  c = params["bn_scale"].shape[0]
  params["bn_scale"] = jax.device_put(rng.uniform(0.5, 1.5, c).astype(F32))
  params["bn_bias"] = jax.device_put(rng.normal(size=c).astype(F32))
  stats = {"mean": jax.device_put(rng.normal(size=c).astype(F32) * 0.3),
           "var": jax.device_put(rng.uniform(0.5, 3, c).astype(F32))}
  return {**variables, "params": params, "batch_stats": stats}


@pytest.mark.parametrize("use_bias", [False, True])
def test_layout(use_bias):
  variables = _init(use_bias=use_bias)
  expected = {"kernel", "bn_scale", "bn_bias"} | ({"bias"} if use_bias else set())
  assert set(variables) == {"params", "batch_stats", "quant_stats"}
  assert set(variables["params"]) == expected
  assert variables["params"]["kernel"].shape == (3, 3, 3, 6)
  assert set(variables["batch_stats"]) == {"mean", "var"}
  assert set(variables["quant_stats"]) == {"weight", "output"}
  assert variables["quant_stats"]["weight"]["min_val"].shape == (6,)
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(6, F32))
  dense = jax.eval_shape(functools.partial(QuantDenseBN(5, qconfig=QAT).init, train=True,
                                           mode="float"), jax.random.key(0), X_VEC)
  assert set(dense["params"]) == {"kernel", "bn_scale", "bn_bias"}
  assert set(dense["batch_stats"]) == {"mean", "var"}
  assert set(dense["quant_stats"]) == {"weight", "output"}


class FloatModeTest(chex.TestCase):
  """mode="float" is nn.Conv followed by nn.BatchNorm (PyTorch's running-variance update)."""

  def _stock(self, variables, x, train):
    p = variables["params"]
    conv = nn.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False)
    y = conv.apply({"params": {"kernel": p["kernel"]}}, x)
    bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
    return bn.apply({"params": {"scale": p["bn_scale"], "bias": p["bn_bias"]},
                     "batch_stats": variables["batch_stats"]}, y, mutable=["batch_stats"])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(False, True)
  def test_float_mode_is_conv_then_batch_norm(self, train):
    layer = _conv_bn(activation=nn.relu)
    variables = _randomised(_init(activation=nn.relu, mode="float"))
    apply = self.variant(functools.partial(layer.apply, train=train, mode="float",
                                           mutable=["batch_stats", "quant_stats"]))
    y, updates = apply(variables, X_IMG)
    expected, stock_updates = jax.jit(self._stock, static_argnums=2)(variables, X_IMG, train)
    _assert_float_close(np.asarray(y), np.asarray(nn.relu(expected)))
    # Float mode observes nothing.
    chex.assert_trees_all_equal(updates["quant_stats"], variables["quant_stats"])
    if not train:
      chex.assert_trees_all_equal(updates["batch_stats"], variables["batch_stats"])
      return
    # The mean moves as in Flax; the variance with the unbiased batch variance (PyTorch).
    n = 4 * 5 * 5
    old = variables["batch_stats"]
    flax_var = np.asarray(stock_updates["batch_stats"]["var"])
    biased = (flax_var - 0.9 * np.asarray(old["var"])) / 0.1
    np.testing.assert_allclose(updates["batch_stats"]["mean"],
                               stock_updates["batch_stats"]["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"],
                               0.9 * np.asarray(old["var"]) + 0.1 * biased * n / (n - 1),
                               rtol=1e-4)


def test_running_averages_update_only_when_training():
  layer = _conv_bn()
  initial = _init(train=True)
  assert np.all(np.asarray(initial["batch_stats"]["var"]) == 1)
  variables = _randomised(initial)

  @jax.jit
  def frozen_and_trained(variables, x):
    apply = functools.partial(layer.apply, variables, x, mode="qat",
                              mutable=["batch_stats", "quant_stats"])
    return apply(train=False)[1], apply(train=True)[1]

  frozen, trained = frozen_and_trained(variables, X_IMG)
  chex.assert_trees_all_equal(frozen["batch_stats"], variables["batch_stats"])
  assert int(frozen["quant_stats"]["weight"]["count"]) == 1  # QAT with a frozen BatchNorm
  assert not np.allclose(trained["batch_stats"]["mean"], variables["batch_stats"]["mean"])


def test_calibrate_observes_the_scaled_weight_and_passes_values():
  """The weight point sees W * gamma / sqrt(running_var + eps) (the running variance before
  this batch's update); the output equals the float forward up to rounding."""
  layer = _conv_bn(use_bias=True, activation=nn.relu)
  variables = _randomised(_init(use_bias=True, activation=nn.relu))

  @jax.jit
  def calibrate_and_float(variables, x):
    apply = functools.partial(layer.apply, variables, x, train=True,
                              mutable=["batch_stats", "quant_stats"])
    return apply(mode="calibrate"), apply(mode="float")[0]

  (y, updates), y_float = calibrate_and_float(variables, X_IMG)
  p, stats = variables["params"], variables["batch_stats"]
  s = np.asarray(p["bn_scale"]) / np.sqrt(np.asarray(stats["var"]) + F32(1e-5))
  scaled = np.asarray(p["kernel"]) * s
  weight = updates["quant_stats"]["weight"]
  np.testing.assert_array_equal(weight["min_val"], scaled.reshape(-1, 6).min(0))
  np.testing.assert_array_equal(weight["max_val"], scaled.reshape(-1, 6).max(0))
  _assert_float_close(np.asarray(y), np.asarray(y_float))
  out = updates["quant_stats"]["output"]
  assert float(out["min_val"]) == float(jnp.min(y)) and float(out["max_val"]) == float(jnp.max(y))


@pytest.mark.parametrize("module, x", [(_conv_bn, X_IMG), (
    functools.partial(QuantDenseBN, 5, qconfig=QAT), X_VEC)], ids=["conv", "dense"])
def test_qat_eval_is_the_folded_layer(module, x):
  """With the running averages (train=False), the QAT forward is the converted layer:
  FQ_out(act(contract(x, FQ_w(W')) + b')) with (W', b') = folded_kernel_and_bias."""
  layer = module(use_bias=True, activation=nn.relu)
  if module is _conv_bn:
    variables = _randomised(_init(use_bias=True, activation=nn.relu))
  else:
    variables = _randomised(_init_with_numpy_kernels(
        functools.partial(layer.init, train=False, mode="qat"), jax.random.key(0), x))

  @jax.jit
  def calibrate_qat_and_fold(variables, x):
    """The calibrated variables, the layer's QAT forward and the folded layer's."""
    _, calibrated = layer.apply(variables, x * 1.5, train=False, mode="calibrate",
                                mutable=["quant_stats"])
    variables = {**variables, **calibrated}
    y = layer.apply(variables, x, train=False, mode="qat")
    kernel, bias = folded_kernel_and_bias(variables["params"], variables["batch_stats"])
    w = qnn.FakeQuant(QAT.weight).apply({"quant_stats": variables["quant_stats"]["weight"]},
                                        kernel, mode="qat")
    if kernel.ndim == 2:
      z = x @ w + bias.reshape(1, -1)
    else:
      z = nn.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1))).apply(
          {"params": {"kernel": w, "bias": bias}}, x)
    out = qnn.FakeQuant(QAT.activation).apply(
        {"quant_stats": variables["quant_stats"]["output"]}, nn.relu(z), mode="qat")
    return variables, y, out

  variables, y, out = calibrate_qat_and_fold(variables, x)
  qparams = qnn.collect_qparams(layer, variables, x, train=False, mode="float")
  # W * s (QAT) and W * (gamma * r) (fold) may differ in the last bit, which can move a
  # weight or an output across a rounding boundary: allow one output step, rarely.
  step = float(qparams["output"]["scale"])
  diff = np.abs(np.asarray(y) - np.asarray(out))
  assert diff.max() <= step * 1.001, diff.max()
  assert np.mean(diff > 1e-5) < 0.02, np.mean(diff > 1e-5)


def test_gradients_reach_every_parameter():
  layer = _conv_bn(use_bias=True, activation=nn.relu)
  variables = _randomised(_init(use_bias=True, activation=nn.relu))

  def loss(params):
    y, _ = layer.apply({**variables, "params": params}, X_IMG, train=True, mode="qat",
                       mutable=["batch_stats", "quant_stats"])
    return jnp.sum(jnp.square(y - 0.5))

  grads = jax.jit(jax.grad(loss))(variables["params"])
  for name, g in grads.items():
    assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0), name


def test_qconfig_none_and_learnable():
  """qconfig None: no quantization points' effect (the float layer); learnable points put
  their scales in params."""
  plain = QuantConvBN(6, (3, 3), qconfig=None)
  variables = _randomised(_init_with_numpy_kernels(
      functools.partial(plain.init, train=False, mode="qat"), jax.random.key(0), X_IMG))
  assert "quant_stats" not in variables
  y, y_float = jax.jit(lambda v, x: (plain.apply(v, x, train=False, mode="qat"),
                                     plain.apply(v, x, train=False, mode="float")))(
                                         variables, X_IMG)
  _assert_float_close(np.asarray(y), np.asarray(y_float))
  lsq = qnn.QConfig(weight=QAT.weight, activation=QAT.activation, learnable=True)
  # Only the layout matters here: traced, not run.
  params = jax.eval_shape(functools.partial(
      QuantConvBN(6, (3, 3), qconfig=lsq).init, train=False, mode="qat"),
                          jax.random.key(0), X_IMG)["params"]
  assert set(params["weight"]) == {"scale"} and set(params["output"]) == {"scale",
                                                                           "zero_point"}


@pytest.mark.parametrize("call, error, match", [
    (dict(train=True, mode="qat"), ValueError, r"'batch_stats', which is immutable"),
    (dict(train=1, mode="qat"), TypeError, "train must be True"),
    (dict(train=False, mode="int8"), ValueError,
     r"mode='int8' needs this module's integer op"),
    (dict(train=False, mode="train"), ValueError,
     r"mode must be one of \['float', 'calibrate', 'qat', 'int8'\]"),
])
def test_misuse_errors(call, error, match):
  layer = _conv_bn()
  variables = _init()
  # The checks run while the forward is traced: eval_shape raises them without computing.
  with pytest.raises(error, match=match):
    jax.eval_shape(functools.partial(layer.apply, mutable=["quant_stats"], **call),
                   variables, X_IMG)


def test_field_errors():
  # The checks run while init is traced: eval_shape raises them without computing.
  with pytest.raises(ValueError, match=r"QuantConvBN: momentum must lie in \[0, 1\]"):
    jax.eval_shape(functools.partial(QuantConvBN(6, (3, 3), qconfig=QAT, momentum=1.5).init,
                                     train=False, mode="qat"), jax.random.key(0), X_IMG)
  with pytest.raises(ValueError, match="more than one value per channel"):
    jax.eval_shape(functools.partial(QuantDenseBN(5, qconfig=QAT).init, train=True, mode="qat"),
                   jax.random.key(0), jax.ShapeDtypeStruct((1, 7), jnp.float32))


def test_inside_a_model_paths():
  """Nested layers keep the layout under their module path (what convert looks up)."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, *, train, mode):
      x = qnn.Quantize(QAT)(x, mode=mode)
      x = QuantConvBN(4, (3, 3), qconfig=QAT, activation=nn.relu, name="c1")(
          x, train=train, mode=mode)
      x = x.reshape((x.shape[0], -1))
      return QuantDenseBN(3, qconfig=QAT, name="d1")(x, train=train, mode=mode)

  model = Model()
  variables = _init_with_numpy_kernels(
      functools.partial(model.init, train=False, mode="qat"), jax.random.key(0), X_IMG)
  assert set(variables["batch_stats"]) == {"c1", "d1"}
  assert set(variables["quant_stats"]) == {"Quantize_0", "c1", "d1"}
  _, updates = jax.jit(functools.partial(model.apply, train=True, mode="qat",
                                         mutable=["batch_stats", "quant_stats"]))(
                                             variables, X_IMG)
  qnn.check_calibrated(updates["quant_stats"])


def test_observer_for_per_tensor_weights():
  """A per-tensor weight observer works too (qnnpack-style qconfig)."""
  q = qnn.QConfig(weight=obs.MinMaxObserver(spec=QuantSpec(bits=8, symmetric=True)),
                  activation=QAT.activation)
  layer = QuantDenseBN(5, qconfig=q)

  @jax.jit
  def init_and_step(x):
    variables = layer.init(jax.random.key(0), x, train=False, mode="qat")
    return layer.apply(variables, x, train=True, mode="qat",
                       mutable=["batch_stats", "quant_stats"])

  _, updates = init_and_step(X_VEC)
  assert updates["quant_stats"]["weight"]["min_val"].shape == ()


# Full-range uint8 activations: the int8 path clamps 8-bit grids at their storage range
# (PyTorch's converted kernels do), so with reduce_range's [0, 127] the fake-quant forward
# would clamp values the converted model keeps.
_Q8 = qnn.bits_qconfig(8)


class _FoldedModel(nn.Module):
  """Quantize -> ConvBN+ReLU -> max pool -> DenseBN+ReLU -> Dense -> Dequantize."""

  @nn.compact
  def __call__(self, x, *, train, mode):
    x = qnn.Quantize(_Q8)(x, mode=mode)
    x = QuantConvBN(4, (3, 3), qconfig=_Q8, activation=nn.relu, name="c1")(
        x, train=train, mode=mode)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = QuantDenseBN(6, qconfig=_Q8, activation=nn.relu, name="d1")(x, train=train, mode=mode)
    x = qnn.QuantDense(3, qconfig=_Q8, name="out")(x, mode=mode)
    return qnn.Dequantize()(x, mode=mode)


@functools.cache
def _qat_trained_folded_model():
  """_FoldedModel after three QAT steps: (model, x, variables, eval-mode fake-quant output),
  shared by the requantizers."""
  model = _FoldedModel()
  x = np.random.default_rng(1).normal(size=(16,) + X_IMG.shape[1:]).astype(F32)
  variables = _init_with_numpy_kernels(
      functools.partial(model.init, train=False, mode="qat"), jax.random.key(0), x)
  step = jax.jit(functools.partial(model.apply, train=True, mode="qat",
                                   mutable=["batch_stats", "quant_stats"]))
  for i in range(3):
    _, updates = step(variables, x + F32(0.1 * i))
    variables = {**variables, **updates}
  y_fq = np.asarray(jax.jit(functools.partial(model.apply, train=False, mode="qat"))(
      variables, x))
  return model, x, variables, y_fq


@pytest.mark.parametrize("requant", ["float", "integer", "fbgemm"])
def test_convert_folded_bn_layers(requant):
  """After QAT steps, qjax.convert folds the BatchNorm (folded_kernel_and_bias with the
  running statistics) and the int8 path computes the eval-mode QAT forward's integers: its
  dequantized output lies on the same grid and agrees with the fake-quant forward up to one
  output step (float rounding of the fold vs the in-training scaling)."""
  from qjax import convert, integer  # pylint: disable=import-outside-toplevel
  model, x, variables, y_fq = _qat_trained_folded_model()
  # weights="stats": the grids of the fake-quant forward (the default observes the folded
  # kernel once more, as PyTorch's convert does, which moves a moving-average grid a little).
  with pytest.warns(UserWarning, match="are clamped, as the fake-quant forward clamps them"):
    int_vars = convert(model, variables, x, requant=requant, train=False, weights="stats")
  ops = int_vars[integer.COLLECTION]
  assert set(ops) == {"Quantize_0", "c1", "d1", "out", "Dequantize_0"}
  assert "batch_stats" not in int_vars and "params" not in int_vars
  kernel, bias = folded_kernel_and_bias(variables["params"]["c1"], variables["batch_stats"]["c1"])
  w_scale = np.asarray(ops["c1"]["op"].kernel.scale)
  np.testing.assert_array_equal(
      np.asarray(ops["c1"]["op"].kernel.qvalue),
      np.clip(np.rint(np.asarray(kernel) / w_scale), -128, 127).astype(np.int8))
  y_int = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False, mode="int8"))(
      int_vars, x))
  out_scale = float(ops["Dequantize_0"]["op"].scale)
  steps = np.abs(y_int - y_fq) / out_scale
  assert np.max(steps) <= 1.0 + 1e-3
  assert np.mean(steps < 1e-3) >= 0.9
