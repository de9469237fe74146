"""Flax layer: observer state in "quant_stats", modes, QAT against a stop_gradient reference,
and misuse errors that name the module path."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from qjax import QuantSpec, numerics
from qjax import nn as qnn
from qjax import observers as obs

RNG = np.random.default_rng(3)
X = jnp.asarray(RNG.standard_normal((6, 5)).astype(np.float32))
MINMAX = qnn.QConfig(activation=obs.MinMaxObserver(spec=QuantSpec(bits=4, signed=False)),
                     weight=obs.MinMaxObserver(spec=QuantSpec(bits=4, symmetric=True, axis=-1)))


class MLP(nn.Module):
  """PyTorch placement: Quantize, QuantDense with fused ReLU, QuantDense, Dequantize."""
  qconfig: qnn.qconfig.QConfigLike = MINMAX

  @nn.compact
  def __call__(self, x, *, mode):
    x = qnn.Quantize(self.qconfig)(x, mode=mode)
    x = qnn.QuantDense(7, qconfig=self.qconfig, activation=nn.relu)(x, mode=mode)
    x = qnn.QuantDense(3, qconfig=self.qconfig)(x, mode=mode)
    return qnn.Dequantize()(x, mode=mode)


class StockMLP(nn.Module):
  """AQT / Qwix placement: stock nn.Dense layers with the quantized contraction."""
  qconfig: qnn.qconfig.QConfigLike = MINMAX

  @nn.compact
  def __call__(self, x, *, mode):
    dot = functools.partial(qnn.QuantDotGeneral, qconfig=self.qconfig, mode=mode)
    x = nn.relu(nn.Dense(7, dot_general_cls=dot)(x))
    return nn.Dense(3, dot_general_cls=dot)(x)


def _init(model=None, x=X, mode="qat"):
  model = model or MLP()
  return model, model.init(jax.random.key(0), x, mode=mode)


def _counts(stats):
  return [int(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(stats)
          if path[-1].key == "count"]


class StatsCollectionTest(parameterized.TestCase):

  def test_layout(self):
    _, variables = _init()
    stats = variables["quant_stats"]
    assert set(stats) == {"Quantize_0", "QuantDense_0", "QuantDense_1"}  # Dequantize: no state
    assert set(stats["QuantDense_0"]) == {"weight", "output"}
    assert stats["QuantDense_1"]["weight"]["min_val"].shape == (3,)
    assert set(stats["Quantize_0"]) == {"min_val", "max_val", "count", "skipped"}
    assert set(variables["params"]["QuantDense_0"]) == {"kernel", "bias"}

  def test_stock_layer_layout(self):
    """The contraction shares the stock layer's scope: stats sit at <layer>/input, /weight."""
    _, variables = _init(StockMLP())
    stats = variables["quant_stats"]
    assert set(stats) == {"Dense_0", "Dense_1"}
    assert set(stats["Dense_0"]) == {"input", "weight"}
    assert stats["Dense_1"]["weight"]["min_val"].shape == (3,)

  def test_params_match_stock_dense(self):
    """QuantDense keeps nn.Dense's parameters: float checkpoints load unchanged."""
    dense = nn.Dense(7).init(jax.random.key(0), X)["params"]
    quant = qnn.QuantDense(7, qconfig=MINMAX).init(jax.random.key(0), X, mode="float")["params"]
    chex.assert_trees_all_equal(dense, quant)

  @parameterized.parameters("float", "calibrate", "qat")
  def test_init_does_not_update(self, mode):
    _, variables = _init(mode=mode)
    assert set(_counts(variables["quant_stats"])) == {0}

  def test_float_mode_is_the_float_model(self):
    model, variables = _init()
    y = model.apply(variables, X, mode="float")
    params = variables["params"]
    h = nn.relu(X @ params["QuantDense_0"]["kernel"] + params["QuantDense_0"]["bias"][None])
    np.testing.assert_array_equal(
        y, h @ params["QuantDense_1"]["kernel"] + params["QuantDense_1"]["bias"][None])

  def test_float_forward_needs_no_stats(self):
    model, variables = _init()
    np.testing.assert_array_equal(model.apply({"params": variables["params"]}, X, mode="float"),
                                  model.apply(variables, X, mode="float"))

  def test_calibrate_observes_without_changing_values(self):
    model, variables = _init()
    y, updates = model.apply(variables, X, mode="calibrate", mutable=["quant_stats"])
    np.testing.assert_array_equal(y, model.apply(variables, X, mode="float"))
    assert set(_counts(updates["quant_stats"])) == {1}
    stub = updates["quant_stats"]["Quantize_0"]
    assert float(stub["min_val"]) == float(X.min()) and float(stub["max_val"]) == float(X.max())

  def test_qat_with_immutable_stats_freezes_observers(self):
    model, variables = _init()
    _, updates = model.apply(variables, X, mode="calibrate", mutable=["quant_stats"])
    calibrated = {**variables, **updates}
    frozen = model.apply(calibrated, X * 3.0, mode="qat")  # quant_stats immutable: no update
    learning, again = model.apply(calibrated, X * 3.0, mode="qat", mutable=["quant_stats"])
    assert set(_counts(again["quant_stats"])) == {2}
    # Frozen ranges clip the wider batch at the first quantization point; updated ones do not.
    stub = qnn.Quantize(MINMAX)
    stub_stats = {"quant_stats": calibrated["quant_stats"]["Quantize_0"]}
    assert float(stub.apply(stub_stats, X * 3.0, mode="qat").max()) <= float(X.max()) + 1e-6
    assert not np.array_equal(frozen, learning)

  def test_qat_values_lie_on_the_grid(self):
    model, variables = _init()
    _, updates = model.apply(variables, X, mode="calibrate", mutable=["quant_stats"])
    calibrated = {**variables, **updates}
    qparams = qnn.collect_qparams(model, calibrated, X, mode="float")
    y = model.apply(calibrated, X, mode="qat")
    out = qparams["QuantDense_1"]["output"]
    levels = np.asarray(y) / float(out["scale"]) + int(out["zero_point"])
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert len(np.unique(np.round(levels))) <= 16  # 4-bit output grid

  def test_none_qconfig_leaves_layers_in_float(self):
    model, variables = _init(MLP(qconfig=None))
    np.testing.assert_array_equal(model.apply(variables, X, mode="qat"),
                                  model.apply(variables, X, mode="float"))
    assert "quant_stats" not in variables

  def test_qconfig_map_per_layer(self):
    """Patterns match layer paths, for qjax layers and for stock layers alike."""
    qmap = qnn.QConfigMap(default=MINMAX, overrides=((r"^QuantDense_1$", None),))
    _, variables = _init(MLP(qconfig=qmap))
    assert set(variables["quant_stats"]) == {"Quantize_0", "QuantDense_0"}
    qmap = qnn.QConfigMap(default=MINMAX, overrides=((r"^Dense_0$", None),))
    _, variables = _init(StockMLP(qconfig=qmap))
    assert set(variables["quant_stats"]) == {"Dense_1"}

  def test_qconfig_map_pattern_that_decides_no_layer_raises(self):
    """A typo in a pattern would leave its layer quantized with the default: refused, naming
    the pattern and listing the layer paths, before or after init, for both placements."""
    typo = qnn.QConfigMap(default=MINMAX, overrides=((r"^QuantDense_2$", None),))
    model, variables = _init(MLP(qconfig=typo), mode="float")
    message = (r"QConfigMap: 1 override pattern\(s\) decide no layer: '\^QuantDense_2\$' matches "
               r"no layer path\. .* The layer paths looked up: 'QuantDense_0', 'QuantDense_1', "
               r"'Quantize_0'\.")
    for _ in range(2):  # a second check traces again: nothing is cached
      with pytest.raises(ValueError, match=message):
        qnn.check_qconfig_map(model, None, X, mode="float")
      with pytest.raises(ValueError, match=message):
        qnn.check_qconfig_map(model, variables, X, mode="qat")
    stock = qnn.QConfigMap(default=MINMAX, overrides=((r"^Dense_0/", None),))
    with pytest.raises(ValueError, match=r"'\^Dense_0/' matches no layer path.*looked up: "
                       r"'Dense_0', 'Dense_1'\."):
      qnn.check_qconfig_map(StockMLP(qconfig=stock), None, X, mode="float")

  def test_qconfig_map_shadowed_pattern_raises(self):
    qmap = qnn.QConfigMap(default=MINMAX, overrides=((r"^QuantDense", None),
                                                     (r"^QuantDense_1$", MINMAX)))
    with pytest.raises(ValueError, match=r"'\^QuantDense_1\$' matches only 'QuantDense_1', "
                       r"which the earlier pattern\(s\) '\^QuantDense' already take"):
      qnn.check_qconfig_map(MLP(qconfig=qmap), None, X, mode="float")

  def test_qconfig_map_whose_patterns_all_decide_passes(self):
    qmap = qnn.QConfigMap(default=MINMAX, overrides=((r"^QuantDense_1$", None),
                                                     (r"^Quantize", MINMAX)))
    model, variables = _init(MLP(qconfig=qmap))
    assert qnn.check_qconfig_map(model, variables, X, mode="qat") is None
    with qnn.qconfig.checked_lookups() as seen:
      model.apply(variables, X, mode="float")
    assert seen == {qmap: {"Quantize_0", "QuantDense_0", "QuantDense_1"}}
    assert qmap.unused_patterns(["QuantDense_0"]) == (r"^QuantDense_1$", r"^Quantize")
    with pytest.raises(ValueError, match=r"decide no layer: '\^Quantize' matches no layer path"):
      qmap.check_used(["QuantDense_1"])
    with pytest.raises(TypeError, match="single string 'QuantDense_1'. Wrap it in a list"):
      qmap.check_used("QuantDense_1")

  def test_conv(self):
    x = jnp.asarray(RNG.standard_normal((2, 8, 8, 3)).astype(np.float32))
    conv = qnn.QuantConv(4, (3, 3), qconfig=MINMAX)
    variables = conv.init(jax.random.key(0), x, mode="float")
    stats = variables["quant_stats"]
    assert stats["weight"]["min_val"].shape == (4,)
    _, updates = conv.apply(variables, x, mode="calibrate", mutable=["quant_stats"])
    y = conv.apply({**variables, **updates}, x, mode="qat")
    assert y.shape == (2, 8, 8, 4) and not np.array_equal(y, conv.apply(variables, x, mode="float"))


def _reference_qat_dense(params, x, spec_out, spec_w):
  """A QAT Dense (PyTorch placement) written with stop_gradient: y = fq(x @ fq(W) + b), with
  fq(v) = v + sg(q(v) - v) inside the grid and sg(q(v)) outside (zero gradient for clamped
  values); qparams from min/max of this batch."""

  def fq(v, spec):
    qp = numerics.qparams_from_minmax(*numerics.minmax(jax.lax.stop_gradient(v), spec), spec)
    q = numerics.quantize_dequantize(v, spec, qp)
    scale = numerics.broadcast_qparam(qp.scale, spec, v.ndim)
    zp = numerics.broadcast_qparam(qp.zero_point, spec, v.ndim).astype(jnp.float32)
    shifted = jnp.round(v * (1.0 / scale)) + zp
    inside = (shifted >= spec.qmin) & (shifted <= spec.qmax)
    return jnp.where(inside, v + jax.lax.stop_gradient(q - v), jax.lax.stop_gradient(q))

  return fq(x @ fq(params["kernel"], spec_w) + params["bias"][None], spec_out)


class QatReferenceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_forward_and_backward_match_stop_gradient_reference(self):
    layer = qnn.QuantDense(4, qconfig=MINMAX)
    x = jnp.asarray(RNG.standard_normal((9, 5)).astype(np.float32))
    variables = layer.init(jax.random.key(1), x, mode="qat")
    upstream = jnp.asarray(RNG.standard_normal((9, 4)).astype(np.float32))

    def loss(params, x):
      y, _ = layer.apply({**variables, "params": params}, x, mode="qat", mutable=["quant_stats"])
      return jnp.sum(y * upstream), y

    def ref_loss(params, x):
      y = _reference_qat_dense(params, x, MINMAX.activation.spec, MINMAX.weight.spec)
      return jnp.sum(y * upstream), y

    grad = self.variant(jax.grad(loss, argnums=(0, 1), has_aux=True))
    (g_params, g_x), y = grad(variables["params"], x)
    (r_params, r_x), r_y = jax.grad(ref_loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
    np.testing.assert_array_equal(y, r_y)
    chex.assert_trees_all_close(g_params, r_params, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g_x, r_x, rtol=1e-6, atol=1e-6)

  def test_clamped_values_get_exactly_zero_gradient(self):
    """Frozen (calibrated) ranges, inputs beyond them: those inputs get no gradient at all."""
    point = qnn.FakeQuant(observer=obs.MinMaxObserver(spec=QuantSpec(bits=8, signed=False)))
    calib = jnp.linspace(-1.0, 1.0, 11, dtype=jnp.float32)
    variables = point.init(jax.random.key(0), calib, mode="calibrate")
    _, updates = point.apply(variables, calib, mode="calibrate", mutable=["quant_stats"])
    x = jnp.array([-5.0, -0.3, 0.0, 0.7, 1.5, 4.0], jnp.float32)
    g = jax.grad(lambda v: jnp.sum(point.apply(updates, v, mode="qat")))(x)
    np.testing.assert_array_equal(g, [0.0, 1.0, 1.0, 1.0, 0.0, 0.0])


class TrainStepTest(parameterized.TestCase):

  def test_jitted_optax_step_threads_stats(self):
    import optax
    model, variables = _init()
    tx = optax.sgd(0.1)
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(params, stats, opt_state, x):
      def loss_fn(p):
        y, updates = model.apply({"params": p, "quant_stats": stats}, x, mode="qat",
                                 mutable=["quant_stats"])
        return jnp.mean(y**2), updates["quant_stats"]
      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), stats, opt_state, loss

    params, stats = variables["params"], variables["quant_stats"]
    losses = []
    for _ in range(5):
      params, stats, opt_state, loss = step(params, stats, opt_state, X)
      losses.append(float(loss))
    assert set(_counts(stats)) == {5}
    assert losses[-1] < losses[0]


class MisuseTest(parameterized.TestCase):

  def test_calibrate_with_immutable_stats(self):
    model, variables = _init()
    with pytest.raises(ValueError, match=r"Quantize_0: mode='calibrate' .* immutable"):
      model.apply(variables, X, mode="calibrate")

  def test_uncalibrated_layer(self):
    model, variables = _init()
    with pytest.raises(ValueError, match=r"Quantize_0: .*has seen no data"):
      qnn.collect_qparams(model, variables, X, mode="float")
    with pytest.raises(ValueError, match=r"has seen no data"):
      model.apply(variables, X, mode="qat")

  def test_partly_calibrated_layer_is_named(self):
    """Stats of one layer reset to empty: the error names exactly that layer's path."""
    model, variables = _init()
    _, updates = model.apply(variables, X, mode="calibrate", mutable=["quant_stats"])
    stats = jax.tree_util.tree_map(lambda v: v, updates["quant_stats"])
    stats["QuantDense_1"]["output"] = variables["quant_stats"]["QuantDense_1"]["output"]
    with pytest.raises(ValueError, match=r"^QuantDense_1/output: "):
      qnn.collect_qparams(model, {**variables, "quant_stats": stats}, X, mode="float")

  def test_unknown_mode(self):
    model, variables = _init()
    with pytest.raises(ValueError, match=r"mode must be one of \['float', 'calibrate', 'qat', 'int8'\]"):
      model.apply(variables, X, mode="train")

  def test_mode_given_twice(self):
    layer = qnn.QuantDense(3, qconfig=MINMAX, mode="qat")
    with pytest.raises(ValueError, match="given both as an attribute"):
      layer.init(jax.random.key(0), X, mode="float")

  def test_missing_mode(self):
    layer = nn.Dense(3, dot_general_cls=functools.partial(qnn.QuantDotGeneral, qconfig=MINMAX))
    with pytest.raises(ValueError, match="mode is required"):
      layer.init(jax.random.key(0), X)

  def test_per_channel_axis_on_contracted_dim(self):
    qconfig = qnn.QConfig(activation=None, weight=obs.MinMaxObserver(
        spec=QuantSpec(bits=8, symmetric=True, axis=-1)))

    class TransposedKernel(nn.Module):  # kernel (out, in): axis -1 is contracted
      @nn.compact
      def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, x.shape[-1]))
        dot = qnn.QuantDotGeneral(qconfig=qconfig, mode="qat")
        return dot(x, kernel, (((1,), (1,)), ((), ())))

    with pytest.raises(ValueError, match=r"^TransposedKernel: the weight's per-channel axis 1 "
                                         r"\(spec.axis=-1\) of a kernel of shape \(3, 5\)"):
      TransposedKernel().init(jax.random.key(0), X)

  def test_qconfig_with_mismatched_specs(self):
    with pytest.raises(ValueError, match=r"QConfig.activation must be per-tensor"):
      qnn.QConfig(activation=obs.MinMaxObserver(spec=QuantSpec(bits=8, axis=0)), weight=None)
    with pytest.raises(ValueError, match=r"QConfig.weight: per-channel weights .*\(axis=-1\)"):
      qnn.QConfig(activation=None,
                  weight=obs.MinMaxObserver(spec=QuantSpec(bits=8, symmetric=True, axis=0)))
    with pytest.raises(TypeError, match="QConfig.weight must be a qjax.observers observer"):
      qnn.QConfig(activation=None, weight=QuantSpec(bits=8))

  def test_integer_input(self):
    model, variables = _init()
    with pytest.raises(TypeError, match=r"Quantize_0: x must be a floating-point array"):
      model.apply(variables, jnp.ones((6, 5), jnp.int32), mode="qat")

  def test_bad_qconfig_type_names_path(self):
    with pytest.raises(TypeError, match="qconfig must be a QConfig, a QConfigMap or None"):
      MLP(qconfig="x86").init(jax.random.key(0), X, mode="float")


def test_presets_match_pytorch_choices():
  default = qnn.default_qconfig
  assert (default.activation.spec.qmin, default.activation.spec.qmax) == (0, 127)
  assert default.weight.spec == QuantSpec(bits=8, signed=True, symmetric=True)
  x86 = qnn.get_default_qconfig("x86")
  assert isinstance(x86.activation, obs.HistogramObserver)
  assert x86.activation.spec.reduce_range and x86.weight.spec.axis == -1
  qat = qnn.get_default_qat_qconfig("x86")
  assert isinstance(qat.activation, obs.MovingAverageMinMaxObserver)
  assert isinstance(qat.weight, obs.MovingAverageMinMaxObserver)
  assert qat.activation.averaging_constant == 0.01 and qat.weight.spec.per_channel
  with pytest.raises(ValueError, match=r"backend must be one of \('x86', 'fbgemm', 'qnnpack'\)"):
    qnn.get_default_qconfig("arm")
  assert hash(x86) == hash(qnn.get_default_qconfig("x86"))


def test_qconfig_passed_to_dequantize_positionally():
  with pytest.raises(TypeError, match=r"Dequantize_0: mode must be one of .* got a QConfig.*"
                                      r"Dequantize takes none"):
    class Bad(nn.Module):
      @nn.compact
      def __call__(self, x):
        return qnn.Dequantize(MINMAX)(x, mode="qat")
    Bad().init(jax.random.key(0), X)


def test_check_calibrated_names_every_empty_point():
  model, variables = _init()
  with pytest.raises(ValueError, match=r"5 quantization point\(s\) have seen no data: "
                                       r"QuantDense_0/output, QuantDense_0/weight, "
                                       r"QuantDense_1/output, QuantDense_1/weight, Quantize_0\."):
    qnn.check_calibrated(variables["quant_stats"])
  _, updates = model.apply(variables, X, mode="calibrate", mutable=["quant_stats"])
  qnn.check_calibrated(updates["quant_stats"])  # all calibrated: no error
  bad = jax.jit(obs.MinMaxObserver(spec=QuantSpec(bits=8)).update)(
      obs.MinMaxObserver(spec=QuantSpec(bits=8)).init(()), jnp.array([jnp.nan]))
  with pytest.raises(ValueError, match=r"^check_calibrated: 1 .*: p \(1 batch\(es\) skipped"):
    qnn.check_calibrated({"p": bad._asdict()})
  with pytest.raises(ValueError, match="quant_stats is empty"):
    qnn.check_calibrated({})


class LearnableTest(chex.TestCase):
  """LSQ points: qparams in "params", initialised by the observer, trained by gradients."""

  AFFINE = obs.MinMaxObserver(spec=QuantSpec(bits=4, signed=False))

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_fake_quant_learnable(self):
    from qjax import ste
    point = qnn.LearnableFakeQuant(observer=self.AFFINE)
    variables = point.init(jax.random.key(0), X, mode="qat")
    params = variables["params"]
    expected = numerics.qparams_from_minmax(X.min(), X.max(), self.AFFINE.spec)
    assert float(params["scale"]) == float(expected.scale)  # data-dependent initialisation
    assert float(params["zero_point"]) == float(expected.zero_point)
    upstream = jnp.asarray(RNG.standard_normal(X.shape).astype(np.float32))
    factor = ste.lsq_grad_factor(self.AFFINE.spec, X.size)

    def loss(p, x):
      return jnp.sum(point.apply({**variables, "params": p}, x * 1.5, mode="qat") * upstream)

    def ref(p, x):
      y = ste.fake_quant_learnable(x * 1.5, self.AFFINE.spec, p["scale"], p["zero_point"],
                                   grad_factor=factor)
      return jnp.sum(y * upstream)

    got = self.variant(jax.grad(loss, argnums=(0, 1)))(params, X)
    want = jax.grad(ref, argnums=(0, 1))(params, X)
    chex.assert_trees_all_equal(got, want)
    assert float(got[0]["scale"]) != 0.0 and float(got[0]["zero_point"]) != 0.0

  def test_calibrate_copies_observed_qparams_only_when_params_mutable(self):
    point = qnn.LearnableFakeQuant(observer=self.AFFINE)
    variables = point.init(jax.random.key(0), X, mode="float")
    wide = X * 4.0
    _, frozen = point.apply(variables, wide, mode="calibrate", mutable=["quant_stats"])
    assert "params" not in frozen
    _, both = point.apply(variables, wide, mode="calibrate", mutable=["quant_stats", "params"])
    expected = numerics.qparams_from_minmax(wide.min(), wide.max(), self.AFFINE.spec)
    assert float(both["params"]["scale"]) == float(expected.scale)

  def test_qconfig_learnable_symmetric_weights_learn_only_the_scale(self):
    qconfig = qnn.QConfig(activation=self.AFFINE, weight=MINMAX.weight, learnable=True)
    layer = qnn.QuantDense(3, qconfig=qconfig, activation=nn.relu)
    variables = layer.init(jax.random.key(0), X, mode="qat")
    params = variables["params"]
    assert set(params["weight"]) == {"scale"} and params["weight"]["scale"].shape == (3,)
    assert set(params["output"]) == {"scale", "zero_point"}
    grads = jax.grad(lambda p: jnp.sum(layer.apply({**variables, "params": p}, X,
                                                   mode="qat") ** 2))(params)
    assert float(jnp.abs(grads["weight"]["scale"]).sum()) > 0
    with pytest.raises(TypeError, match="QConfig.learnable must be True or False"):
      qnn.QConfig(activation=None, weight=None, learnable=1)
