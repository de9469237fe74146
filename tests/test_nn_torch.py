"""Whole-model parity of `qjax.nn` with PyTorch 2.13's eager-mode quantization (CPU).

The MNIST MLP (784-100-100-10) and LeNet-5 of tests/support/torch_models.py are built twice with
identical weights: in torch (QuantStub, fused Linear/Conv+ReLU, DeQuantStub; `prepare` or
`prepare_qat`) and in Flax (Quantize, QuantDense / QuantConv, Dequantize). The same batches go
through both, and every torch observer's state (min_val / max_val, the histogram) and
`calculate_qparams()` must equal the matching qjax quantization point's state and
`collect_qparams` entry, bit for bit.

Which qjax point matches which torch observer (`torch_models.activation_points`): one for
one, as both place the points where a tensor is produced.

  torch QuantStub                  qjax Quantize_0
  torch fused layer i's output     qjax <layer i>/output (after the fused ReLU; for LeNet's
                                   convs before the max pool, as in torch)
  torch last layer's output        qjax fc3/output (DeQuantStub and Dequantize observe nothing)
  torch qconfig.weight() observer  qjax <layer>/weight (per output channel: torch axis 0 of
                                   (out, in, ...), qjax axis -1 of (in, out) / HWIO)

Exactness. Observers downstream of a matmul only agree bit for bit if both frameworks compute
the same layer outputs, and XLA and torch (oneDNN / MKL) sum in different orders. The data are
therefore dyadic with few significant bits, so that every product and partial sum is exact:
  * calibration: inputs k * 2^(e-3), weights in {0, +-1/4, +-1/2}, biases k / 64;
  * QAT: the fake-quantized tensors feed the next layer, so their grids must be dyadic too.
    Each hidden layer has a "pin" unit (zero weights, bias 127 * 2^-p) and a "dead" unit
    (zero weights, negative bias), so that every batch's post-ReLU range is exactly
    [0, 127 * 2^-p] and the scale 2^-p; the input range is [-8, 7.875] in every batch
    (scale 1/8); every weight row reaches +-127.5 * 2^-11 (per-channel scale 2^-11). The
    last layer's output point is not pinned: its moving average moves with each batch.
  * QAT on generic data (`test_qat_input_quantized_once`): the grids are not dyadic, so each
    weight row holds a single non-zero, -127.5 * 2^-11, which fake-quantizes to -2^-4. Every
    layer output is then b + x * -2^-4: an exact product and one rounded addition, the same
    in any summation order, with or without fused multiply-adds.
The tests check these premises (the float forwards agree bit for bit; the pinned ranges held)
before they compare observers.

What torch runs. PTQ: `prepare` in eval mode, weights observed with `qconfig.weight()` as
`convert` does. QAT: `prepare_qat` in train mode with `get_default_qat_qconfig("x86",
version=0)`: FakeQuantize modules that fake-quantize with their observer's
`calculate_qparams()`, which is what qjax does and what `convert` uses. The default
(version=1) fused FusedMovingAvgObsFakeQuantize observes the same moving averages (checked in
calibration, with its fake quantization disabled), but its forward fake-quantizes with qparams
from a different, double-precision formula (see `test_qat_fused_qconfig`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from support import cases  # noqa: E402
import qjax.nn as qnn  # noqa: E402
from support import torch_models  # noqa: E402

from torch.ao import quantization as tq  # noqa: E402

# Torch 2.13 announces the deprecation of eager-mode quantization (QuantStub, prepare,
# prepare_qat) and of observers' reduce_range; both still work.

# ------------------------------------------------------------------------------------------
# Weights and data (dyadic, see the module docstring).


def _calib_weight(rng, fan_in, shape):
  """Sparse weights in {0, +-1/4, +-1/2} with variance ~ 1/fan_in, in torch's layout."""
  density = min(1.0, 6.4 / fan_in)
  values = rng.choice(np.array([-0.5, -0.25, 0.25, 0.5], np.float32), size=shape)
  return np.where(rng.random(shape) < density, values, np.float32(0)).astype(np.float32)


def _qat_weight(rng, shape, k_max, pin_rows=()):
  """Weights k * 2^-11 (|k| <= k_max) whose every row reaches +-127.5 * 2^-11, so that the
  per-channel symmetric scale is 2^-11; `pin_rows` are all zero."""
  w = rng.integers(-k_max, k_max + 1, size=shape).astype(np.float32)
  flat = w.reshape(shape[0], -1)
  cols = rng.integers(0, flat.shape[1], size=shape[0])
  flat[np.arange(shape[0]), cols] = rng.choice(np.array([-127.5, 127.5], np.float32), shape[0])
  flat[list(pin_rows)] = 0
  return (flat.reshape(shape) * np.float32(2.0**-11)).astype(np.float32)


# Pinned post-ReLU range of each hidden layer in the QAT models: [0, 127 * 2^-p], scale 2^-p.
_PIN = {"fc1": 127 / 8, "fc2": 127 / 16, "conv1": 127 / 16, "conv2": 127 / 16}


def _qat_bias(rng, n, name):
  """Biases k / 256; in a pinned layer unit 0 is the pin and unit 1 is dead."""
  b = (rng.integers(-32, 33, size=n) / 256).astype(np.float32)
  if name in _PIN:
    b[0], b[1] = _PIN[name], -1
  return b


_QAT_K_MAX = {"fc1": 64}  # |k| bound of the QAT weights (others 127): keeps fc1 under its pin


def _select_weight(rng, shape):
  """Weights with one non-zero per row, -127.5 * 2^-11 (per-channel scale 2^-11, on which it
  rounds half to even to -128, i.e. -2^-4), at distinct columns: each output unit selects
  one input."""
  w = np.zeros((shape[0], int(np.prod(shape[1:]))), np.float32)
  w[np.arange(shape[0]), rng.permutation(w.shape[1])[:shape[0]]] = -127.5 * 2.0**-11
  return w.reshape(shape)


def _torch_weights(arch, kind, seed):
  """{layer: (weight, bias)} in torch's layouts, for calibration ("calib"), pinned QAT
  ("qat") or generic QAT ("select": selecting weights, generic biases)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in torch_models.TORCH_SHAPES[arch].items():
    fan_in = int(np.prod(shape[1:]))
    if kind == "calib":
      w = _calib_weight(rng, fan_in, shape)
      b = (rng.integers(-16, 17, size=shape[0]) / 64).astype(np.float32)
    elif kind == "select":
      w = _select_weight(rng, shape)
      b = (rng.normal(size=shape[0]) / 4).astype(np.float32)
    else:
      w = _qat_weight(rng, shape, _QAT_K_MAX.get(name, 127),
                      pin_rows=(0, 1) if name in _PIN else ())
      b = _qat_bias(rng, shape[0], name)
    out[name] = (w, b)
  return out


_INPUT_SHAPE = {"mlp": (784,), "lenet": (28, 28, 1)}


def _calib_batches(arch, seed, n=5, batch=8):
  """Batches k * 2^(e-3), |k| <= 64, at scales 2^e that vary from batch to batch; one batch is
  all positive and one all negative, so the input range grows on either side separately."""
  rng = np.random.default_rng(seed)
  shape = (batch, *_INPUT_SHAPE[arch])
  out = []
  for i, e in enumerate((0, 2, -1, 1, 3)[:n]):
    k = rng.integers(-64, 65, size=shape)
    k = np.abs(k) if i == 1 else (-np.abs(k) if i == 3 else k)
    out.append((k * 2.0**(e - 3)).astype(np.float32))
  return out


def _qat_batches(arch, seed, n=4, batch=8):
  """Batches k / 8 in [-8, 7.875] holding both ends (input scale 1/8, zero point 64)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    x = (rng.integers(-64, 64, size=(batch, *_INPUT_SHAPE[arch])) / 8).astype(np.float32)
    x.reshape(batch, -1)[0, :2] = (-8, 7.875)
    out.append(x)
  return out


# ------------------------------------------------------------------------------------------
# Running both sides.


def _run_torch(arch, model, batches, capture=None):
  """The model's outputs on `batches`, and, with `capture` (a layer name), that layer's
  outputs as its observer hook leaves them (fake-quantized in QAT)."""
  captured = []
  handle = None if capture is None else getattr(model, capture).register_forward_hook(
      lambda module, args, output: captured.append(output.numpy().copy()))
  try:
    with torch.no_grad():
      outputs = [model(torch_models.to_torch(arch, x)).numpy() for x in batches]
  finally:
    if handle is not None:
      handle.remove()
  return outputs, captured


def _at(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def _assert_bitwise(expected, actual, what):
  """Equal float32 bit patterns (NaN == NaN, -0.0 != 0.0), reporting the values if not."""
  expected = np.asarray(expected, np.float32)
  actual = np.asarray(actual, np.float32).reshape(expected.shape)
  if not np.array_equal(cases.bits_of(expected), cases.bits_of(actual)):
    bad = np.flatnonzero(cases.bits_of(expected).ravel() != cases.bits_of(actual).ravel())
    raise AssertionError(
        f"{what}: {bad.size} of {expected.size} value(s) differ; first at flat index "
        f"{bad[0]}: torch {expected.ravel()[bad[0]]!r} vs qjax {actual.ravel()[bad[0]]!r}")


def _assert_point(torch_observer, stats, qparams, path, *, times=1):
  """A torch observer's state and calculate_qparams() equal qjax's point at `path`; torch's
  histogram counts are `times` qjax's (see `torch_models.observes_twice`: doubling every batch
  doubles every count exactly, and leaves the L2 search, which compares errors and quantiles
  of the normalised histogram, unchanged)."""
  obs = torch_models.observer(torch_observer)
  names = ("min_val", "max_val") + (("histogram",) if hasattr(obs, "histogram") else ())
  for name in names:
    ours = np.asarray(_at(stats, path)[name])
    if name == "histogram":
      ours = ours * np.float32(times)
    _assert_bitwise(getattr(obs, name).numpy(), ours, f"{path} {name}")
  scale, zero_point = obs.calculate_qparams()
  ours = _at(qparams, path)
  _assert_bitwise(scale.numpy(), ours["scale"], f"{path} scale")
  np.testing.assert_array_equal(
      np.asarray(ours["zero_point"]).astype(np.int64),
      zero_point.numpy().astype(np.int64).reshape(np.shape(ours["zero_point"])),
      err_msg=f"{path} zero_point")


def _torch_weight(module):
  """The float weight of a fused (Sequential) or QAT layer."""
  return module.weight if hasattr(module, "weight") else module[0].weight


# ------------------------------------------------------------------------------------------
# Calibration.

# name -> (torch qconfig factory, qjax qconfig factory, torch QAT modules with fake quant off)
CALIB_QCONFIGS = {
    "default": (lambda: tq.default_qconfig, lambda: qnn.default_qconfig, False),
    "x86": (lambda: tq.get_default_qconfig("x86"), lambda: qnn.get_default_qconfig("x86"),
            False),
    "x86_qat": (lambda: tq.get_default_qat_qconfig("x86"),
                lambda: qnn.get_default_qat_qconfig("x86"), True),
}


@functools.lru_cache(maxsize=None)
def _calibrate(arch, config):
  """Calibrate the torch and qjax models on the same batches; both sides' results."""
  torch_qconfig, qjax_qconfig, qat = CALIB_QCONFIGS[config]
  weights = _torch_weights(arch, "calib", seed=1)
  batches = _calib_batches(arch, seed=2)
  params = torch_models.flax_params(arch, weights)
  qmodel = (torch_models.QMLP if arch == "mlp" else torch_models.QLeNet)(qjax_qconfig())
  tmodel = torch_models.prepare(torch_models.torch_model(arch, weights), torch_qconfig(), qat)
  if qat:  # observe only: the calibration counterpart of qjax's mode="calibrate"
    tmodel.apply(tq.disable_fake_quant)
  outputs, _ = _run_torch(arch, tmodel, batches)
  ours, stats, qparams, _ = torch_models.run_qjax(qmodel, params, batches, "calibrate")
  return tmodel, torch_qconfig(), qat, outputs, ours, stats, qparams


@pytest.mark.parametrize("config", CALIB_QCONFIGS)
@pytest.mark.parametrize("arch", ["mlp", "lenet"])
def test_calibration_activation_observers(arch, config):
  """After the same calibration batches, every torch activation observer (QuantStub, each
  fused layer's output, the last layer's output) has exactly the state (histogram included)
  and qparams of the qjax point that sees the same tensor: Quantize_0, <layer>/output."""
  tmodel, _, _, outputs, ours, stats, qparams = _calibrate(arch, config)
  # Premise: calibration leaves the float forwards alone, and they agree bit for bit, so the
  # observers see the same tensors.
  for i, (t, j) in enumerate(zip(outputs, ours)):
    _assert_bitwise(t, j, f"calibration output, batch {i}")
  for owner, path in torch_models.activation_points(arch).items():
    module = getattr(tmodel, owner)
    _assert_point(module.activation_post_process, stats, qparams, path,
                  times=2 if torch_models.observes_twice(module) else 1)


@pytest.mark.parametrize("config", CALIB_QCONFIGS)
@pytest.mark.parametrize("arch", ["mlp", "lenet"])
def test_calibration_weight_observers(arch, config):
  """Each qjax weight point (per output channel, axis -1 of the Flax kernel) has the state and
  qparams of torch's weight observer on the same weight: `qconfig.weight()` applied to it as
  `convert` does, or the QAT module's weight observer after the calibration forwards."""
  tmodel, torch_qconfig, qat, _, _, stats, qparams = _calibrate(arch, config)
  for name in torch_models.TORCH_SHAPES[arch]:
    module = getattr(tmodel, name)
    if qat:
      observer = module.weight_fake_quant
    else:
      observer = torch_qconfig.weight()
      observer(_torch_weight(module).detach())
    _assert_point(observer, stats, qparams, f"{name}/weight")


# ------------------------------------------------------------------------------------------
# Quantization-aware training.


@functools.lru_cache(maxsize=None)
def _qjax_qat(arch):
  """qjax's QAT run on the pinned weights and batches: (outputs, stats, qparams, [])."""
  qconfig = qnn.get_default_qat_qconfig("x86")
  qmodel = torch_models.QMLP(qconfig) if arch == "mlp" else torch_models.QLeNet(qconfig)
  weights = _torch_weights(arch, "qat", seed=3)
  return torch_models.run_qjax(qmodel, torch_models.flax_params(arch, weights),
                               _qat_batches(arch, seed=4), "qat")


def _qat(arch, torch_qconfig):
  """Torch's train-mode QAT run with `torch_qconfig` and qjax's, on the same data."""
  weights = _torch_weights(arch, "qat", seed=3)
  tmodel = torch_models.prepare(torch_models.torch_model(arch, weights), torch_qconfig,
                                qat=True)
  outputs, _ = _run_torch(arch, tmodel, _qat_batches(arch, seed=4))
  ours, stats, qparams, _ = _qjax_qat(arch)
  return tmodel, outputs, ours, stats, qparams


@pytest.mark.parametrize("arch", ["mlp", "lenet"])
def test_qat_forward_and_observers(arch):
  """Train-mode QAT forwards (torch prepare_qat with the x86 FakeQuantize qconfig, qjax
  mode="qat") give the same fake-quantized outputs, and every observer (activations: moving
  averages of fake-quantized inputs; weights: per channel) ends in the same state with the
  same qparams."""
  tmodel, outputs, ours, stats, qparams = _qat(arch, tq.get_default_qat_qconfig("x86",
                                                                                 version=0))
  # Premise: the pinned hidden ranges held, so every fake-quantized hidden tensor is dyadic.
  for name, pin in _PIN.items():
    if hasattr(tmodel, name):
      obs = torch_models.observer(getattr(tmodel, name).activation_post_process)
      assert (float(obs.min_val), float(obs.max_val)) == (0.0, pin), name
  for i, (t, j) in enumerate(zip(outputs, ours)):
    _assert_bitwise(t, j, f"QAT output, batch {i}")
  for owner, path in torch_models.activation_points(arch).items():
    _assert_point(getattr(tmodel, owner).activation_post_process, stats, qparams, path)
  for name in torch_models.TORCH_SHAPES[arch]:
    _assert_point(getattr(tmodel, name).weight_fake_quant, stats, qparams, f"{name}/weight")


def test_qat_fused_qconfig():
  """With torch's default fused (version=1) x86 QAT qconfig the observers agree where the
  tensors are the same (the model input, the weights), and qjax's weight grids are the ones
  torch's `calculate_qparams()`, hence `convert`, uses. Torch's fused forward fake-quantizes
  weights on another grid: its kernel takes max(-min / 128, max / 127) per channel, in double
  (0.1 for an all-zero channel), where `calculate_qparams()` takes max(-min, max) / 127.5
  (eps), so from the first layer's output on the two QAT forwards differ by design, and the
  downstream observers are not compared. (The grids coincide on a channel whose max is
  127 / 128 of -min, as some here are.)"""
  tmodel, _, _, stats, qparams = _qat("mlp", tq.get_default_qat_qconfig("x86"))
  _assert_point(tmodel.quant.activation_post_process, stats, qparams, "Quantize_0")
  for name in torch_models.TORCH_SHAPES["mlp"]:
    fake_quant = getattr(tmodel, name).weight_fake_quant
    path = f"{name}/weight"
    _assert_point(fake_quant, stats, qparams, path)
    forward_scale = fake_quant.scale.numpy()
    ours = np.asarray(_at(qparams, path)["scale"])
    assert np.any(forward_scale != ours), (name, forward_scale, ours)


def _generic_batches(seed):
  """Generic float batches whose range moves from batch to batch, on both sides."""
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=(8, 784)) * s + o).astype(np.float32)
          for s, o in ((1.0, 0.0), (3.0, 0.5), (0.5, -1.0), (2.0, 2.0), (4.0, -0.5),
                       (1.5, 1.0))]


class QMLPDoubleInput(torch_models.QMLP):
  """QMLP with a second input point between Quantize and fc1: the placement qjax had before
  it followed torch (a consumer-side input point on each layer), which quantized the model
  input twice in QAT. The negative control of `test_qat_input_quantized_once`."""

  @nn.compact
  def __call__(self, x, *, mode):
    q = self.qconfig
    x = qnn.Quantize(q)(x, mode=mode)
    x = qnn.FakeQuant(q.activation, name="fc1_input")(x, mode=mode)
    x = qnn.QuantDense(100, qconfig=q, activation=nn.relu, name="fc1")(x, mode=mode)
    x = qnn.QuantDense(100, qconfig=q, activation=nn.relu, name="fc2")(x, mode=mode)
    x = qnn.QuantDense(10, qconfig=q, name="fc3")(x, mode=mode)
    return qnn.Dequantize()(x, mode=mode)


def test_qat_input_quantized_once():
  """QAT quantizes the model input once, as torch's QuantStub does, on generic data.

  Generic float batches whose range moves from batch to batch, so that every moving average
  (the input's, each layer output's) and every activation grid is generic, and a second
  quantization of the input on a trailing grid would change it. The weights select (module
  docstring): each row's only non-zero fake-quantizes to -2^-4, so each layer output is
  b + x * -2^-4, exact in any summation order. After every batch the fake-quantized output of
  fc1 (the first layer) and the model's are torch's, bit for bit; at the end torch's QuantStub
  observer is qjax's Quantize_0, and every layer's output and weight observer is qjax's.

  Negative control: the same run with a second input point before fc1 (qjax's former
  placement, which quantized the input twice) gives another fc1 output.
  """
  batches = _generic_batches(seed=5)
  weights = _torch_weights("mlp", "select", seed=6)
  params = torch_models.flax_params("mlp", weights)
  qconfig = qnn.get_default_qat_qconfig("x86")
  tmodel = torch_models.prepare(torch_models.torch_model("mlp", weights),
                                tq.get_default_qat_qconfig("x86", version=0), qat=True)
  input_scales = []
  tmodel.quant.register_forward_hook(lambda module, args, output: input_scales.append(
      float(torch_models.observer(module.activation_post_process).calculate_qparams()[0])))
  outputs, fc1 = _run_torch("mlp", tmodel, batches, capture="fc1")
  ours, stats, qparams, our_fc1 = torch_models.run_qjax(torch_models.QMLP(qconfig), params,
                                                        batches, "qat", capture="fc1")
  # Premises: the input grid moved with every batch; the weight grids are 2^-11, on which
  # each row's non-zero is -2^-4.
  assert len(set(input_scales)) == len(batches), input_scales
  for name in torch_models.TORCH_SHAPES["mlp"]:
    fake_quant = getattr(tmodel, name).weight_fake_quant
    scale, zero_point = fake_quant.calculate_qparams()
    assert np.all(scale.numpy() == np.float32(2.0**-11)), name
    w = torch.fake_quantize_per_channel_affine(
        _torch_weight(getattr(tmodel, name)).detach(), scale, zero_point.to(torch.int32),
        fake_quant.ch_axis, fake_quant.quant_min, fake_quant.quant_max).numpy()
    assert set(np.unique(w)) == {-2.0**-4, 0.0}, name
  for i, (t, j) in enumerate(zip(fc1, our_fc1)):
    _assert_bitwise(t, j, f"fc1 fake-quantized output, batch {i}")
  for i, (t, j) in enumerate(zip(outputs, ours)):
    _assert_bitwise(t, j, f"QAT output, batch {i}")
  for owner, path in torch_models.activation_points("mlp").items():
    _assert_point(getattr(tmodel, owner).activation_post_process, stats, qparams, path)
  for name in torch_models.TORCH_SHAPES["mlp"]:
    _assert_point(getattr(tmodel, name).weight_fake_quant, stats, qparams, f"{name}/weight")
  # Negative control: quantizing the input twice moves fc1's output off torch's from the
  # second batch on (the first sets both input ranges alike, and a grid re-applied to itself
  # changes nothing).
  _, _, _, twice = torch_models.run_qjax(QMLPDoubleInput(qconfig), params, batches, "qat",
                                         capture="fc1")
  same = [np.array_equal(cases.bits_of(t), cases.bits_of(j)) for t, j in zip(fc1, twice)]
  assert same == [True] + [False] * (len(batches) - 1), same
