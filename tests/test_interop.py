"""`qjax.interop` against PyTorch 2.13: float state_dicts into Flax variables, and converted
models compared with torch's converted eager-mode models through `to_torch_view`.

Parity runs. A torch MLP (784-100-10, ReLU) and a small conv net (conv-BN-ReLU, max pool,
flatten, linear) are built in torch with random weights; their float `state_dict()` goes
through `load_state_dict` into the same models written with qjax.nn (the conv net's BatchNorm
folded by `qjax.fold_batch_norms`, as torch's `fuse_modules` folds it). Both sides calibrate
on the same batches (torch: QuantStub / DeQuantStub, `fuse_modules`, `prepare` with
get_default_qconfig("fbgemm"); qjax: get_default_qconfig("fbgemm"), mode="calibrate"), both
convert, and per layer the int8 weights, their scales and zero points, the activation grids
and the layer outputs' integers must be equal, 100 %, with each qjax layer fed the integers
torch's layer received; so must the whole model's output.

Determinism. torch's quantized engine is pinned to fbgemm: the "x86" engine runs convolutions
through oneDNN on CPUs with AVX512-VNNI, whose float epilogue differs from fbgemm's (and from
qjax's "fbgemm" requantization) on rare entries, so results would depend on the CPU. The
weights and inputs are dyadic with few significant bits (weights in {0, +-1/4, +-1/2}, biases
k / 64, inputs k / 8, BatchNorm variances with var + eps a power of 4), so every float
product and partial sum is exact and XLA and torch compute the same float activations in any
summation order: the observers see identical data and calibrate identical grids on any CPU.
The tests check that premise (the float forwards agree bit for bit) before comparing integers.
"""

from __future__ import annotations

import copy
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from support import cases  # noqa: E402
import qjax  # noqa: E402
import qjax.nn as qnn  # noqa: E402
from qjax import interop  # noqa: E402
from qjax import convert, for_serving  # noqa: E402
from qjax.integer.forms import DequantizeOp  # noqa: E402

from torch.ao import quantization as tq  # noqa: E402
from torch.nn.utils.fusion import fuse_conv_bn_weights  # noqa: E402


F32 = np.float32
EPS = 1e-5  # BatchNorm epsilon on both sides (the default of each)
QCONFIG = qnn.get_default_qconfig("fbgemm")
LAYERS = (qnn.QuantDense, qnn.QuantConv, qnn.Quantize)
CONV_FLAT = (8, 7, 7)  # the conv net's (C, H, W) before torch's flatten


@pytest.fixture(autouse=True)
def fbgemm_engine():
  """fbgemm for every quantized op, on every x86 CPU (module docstring)."""
  previous = torch.backends.quantized.engine
  torch.backends.quantized.engine = "fbgemm"
  yield
  torch.backends.quantized.engine = previous


# ------------------------------------------------------------------------------------------
# Models: torch (NCHW) and qjax.nn (NHWC), the same layer names.


class TorchMLP(torch.nn.Module):
  FUSE = [["fc1", "relu1"]]

  def __init__(self):
    super().__init__()
    self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
    self.fc1, self.relu1 = torch.nn.Linear(784, 100), torch.nn.ReLU()
    self.fc2 = torch.nn.Linear(100, 10)

  def forward(self, x):
    return self.dequant(self.fc2(self.relu1(self.fc1(self.quant(x)))))


class TorchConvNet(torch.nn.Module):
  """conv 8@3x3 (no bias) + BatchNorm + ReLU on 14x14, max pool 2, flatten (C, H, W), fc 10."""

  FUSE = [["conv1", "bn1", "relu1"]]

  def __init__(self):
    super().__init__()
    self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
    self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1, bias=False)
    self.bn1, self.relu1 = torch.nn.BatchNorm2d(8, eps=EPS), torch.nn.ReLU()
    self.pool = torch.nn.MaxPool2d(2)
    self.fc = torch.nn.Linear(8 * 7 * 7, 10)

  def forward(self, x):
    x = self.pool(self.relu1(self.bn1(self.conv1(self.quant(x)))))
    return self.dequant(self.fc(torch.flatten(x, 1)))


class QMLP(nn.Module):
  @nn.compact
  def __call__(self, x, *, mode):
    x = qnn.Quantize(QCONFIG)(x, mode=mode)
    x = qnn.QuantDense(100, qconfig=QCONFIG, activation=nn.relu, name="fc1")(x, mode=mode)
    x = qnn.QuantDense(10, qconfig=QCONFIG, name="fc2")(x, mode=mode)
    return qnn.Dequantize()(x, mode=mode)


class QConvNet(nn.Module):
  """With `bn`, the float model as torch has it (the state_dict's target); without, the
  BatchNorm folded into conv1 and its ReLU fused (torch's fuse_modules), which quantizes."""

  bn: bool = False

  @nn.compact
  def __call__(self, x, *, mode):
    x = qnn.Quantize(QCONFIG)(x, mode=mode)
    if self.bn:
      x = qnn.QuantConv(8, (3, 3), padding=1, use_bias=False, qconfig=QCONFIG,
                        name="conv1")(x, mode=mode)
      x = nn.relu(nn.BatchNorm(use_running_average=True, epsilon=EPS, name="bn1")(x))
    else:
      x = qnn.QuantConv(8, (3, 3), padding=1, qconfig=QCONFIG, activation=nn.relu,
                        name="conv1")(x, mode=mode)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = qnn.QuantDense(10, qconfig=QCONFIG, name="fc")(x.reshape((x.shape[0], -1)), mode=mode)
    return qnn.Dequantize()(x, mode=mode)


ARCHS = {"mlp": (TorchMLP, QMLP, (784,)), "conv": (TorchConvNet, QConvNet, (14, 14, 1))}


# ------------------------------------------------------------------------------------------
# Dyadic weights and data (module docstring).


def _dyadic_weight(rng, shape, density):
  values = rng.choice(np.array([-0.5, -0.25, 0.25, 0.5], F32), size=shape)
  return np.where(rng.random(shape) < density, values, F32(0)).astype(F32)


def _var_for(power_of_4):
  """A running variance v with fl32(v + eps) exactly `power_of_4` (so 1 / sqrt is exact)."""
  v = np.float32(power_of_4) - np.float32(EPS)
  while np.float32(v + np.float32(EPS)) != np.float32(power_of_4):
    v = np.nextafter(v, np.float32(power_of_4) if v + np.float32(EPS) < power_of_4 else 0,
                     dtype=F32)
  return v


def _dyadic_torch_model(arch, seed=0):
  torch_cls = ARCHS[arch][0]
  rng = np.random.default_rng(seed)
  model = torch_cls().eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        shape = tuple(module.weight.shape)
        fan_in = int(np.prod(shape[1:]))
        module.weight.copy_(torch.from_numpy(
            _dyadic_weight(rng, shape, min(1.0, 8.0 / fan_in))))
        if module.bias is not None:
          module.bias.copy_(torch.from_numpy(
              (rng.integers(-16, 17, size=shape[0]) / 64).astype(F32)))
      elif isinstance(module, torch.nn.BatchNorm2d):
        c = module.num_features
        module.weight.copy_(torch.from_numpy(rng.choice(np.array([0.5, 1, 1.5, 2], F32), c)))
        module.bias.copy_(torch.from_numpy((rng.integers(-8, 9, size=c) / 16).astype(F32)))
        module.running_mean.copy_(torch.from_numpy(
            (rng.integers(-8, 9, size=c) / 16).astype(F32)))
        module.running_var.copy_(torch.from_numpy(
            np.array([_var_for(rng.choice([0.25, 1.0, 4.0])) for _ in range(c)], F32)))
        module.num_batches_tracked.fill_(7)
  return model


def _batches(arch, seed, n=4, batch=16):
  """Batches k / 8, |k| <= 64 (one all positive), NHWC for the conv net."""
  rng = np.random.default_rng(seed)
  shape = (batch, *ARCHS[arch][2])
  out = []
  for i in range(n):
    k = rng.integers(-64, 65, size=shape)
    out.append(((np.abs(k) if i == 1 else k) / 8).astype(F32))
  return out


def _to_torch(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if x.ndim == 4 else x)


# ------------------------------------------------------------------------------------------
# Both sides, once per architecture.


def _shapes(model, x, **kwargs):
  """The model's variables as shapes and dtypes (what load_state_dict needs, no compile)."""
  return jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.key(0),
                        jnp.asarray(x))


@functools.partial(jax.jit, static_argnames="model")
def _fresh_quant_stats(model, x):
  """An init's quant_stats alone (XLA drops the parameter initialisers)."""
  return model.init(jax.random.key(0), x, mode="float")["quant_stats"]


@functools.partial(jax.jit, static_argnames="model")
def _float(model, variables, x):
  """The float forward of params (and batch_stats) alone."""
  return model.apply({k: v for k, v in variables.items() if k != "quant_stats"}, x,
                     mode="float")


@functools.partial(jax.jit, static_argnames="model")
def _calibrate(model, variables, x):
  _, updates = model.apply(variables, x, mode="calibrate", mutable=["quant_stats"])
  return {**variables, **updates}


@functools.partial(jax.jit, static_argnames="model")
def _int8_runs(model, int_vars, x, feeds):
  return cases.int8_layer_runs(model, int_vars, x, feeds, LAYERS)


def _torch_int_run(model, names, x):
  """{name: (input, output)} of the converted torch model's modules, and its float output."""
  captured = {}
  hooks = [getattr(model, n).register_forward_hook(
      lambda m, args, out, n=n: captured.__setitem__(n, (args[0], out))) for n in names]
  try:
    with torch.no_grad():
      final = model(_to_torch(x)).numpy()
  finally:
    for hook in hooks:
      hook.remove()
  return captured, final


@functools.lru_cache(maxsize=None)
def _setup(arch):
  """Load, calibrate and convert on both sides (torch's engine is fbgemm while this runs)."""
  tmodel = _dyadic_torch_model(arch)
  state_dict = {k: v.clone() for k, v in tmodel.state_dict().items()}
  calib, x_eval = _batches(arch, 1), np.concatenate(_batches(arch, 2))
  qmodel = ARCHS[arch][1]()
  target_model = QConvNet(bn=True) if arch == "conv" else qmodel
  target = _shapes(target_model, calib[0], mode="float")
  loaded = interop.load_state_dict(
      state_dict, target, flatten_from={"fc": CONV_FLAT} if arch == "conv" else None)
  float_loaded = _float(target_model, loaded, jnp.asarray(calib[0]))
  if arch == "conv":
    folded = qjax.fold_batch_norms(loaded, [("conv1", "bn1")], epsilon=EPS)
    variables = {"params": folded["params"]}
  else:
    variables = {"params": loaded["params"]}
  variables["quant_stats"] = _fresh_quant_stats(qmodel, jnp.asarray(calib[0]))

  with torch.no_grad():
    float_torch = tmodel(_to_torch(calib[0])).numpy()
  prepared = copy.deepcopy(tmodel).eval()
  tq.fuse_modules(prepared, prepared.FUSE, inplace=True)
  prepared.qconfig = tq.get_default_qconfig("fbgemm")
  tq.prepare(prepared, inplace=True)
  with torch.no_grad():
    float_fused = [prepared(_to_torch(x)).numpy() for x in calib]  # observers see these
  converted = tq.convert(prepared)

  float_qjax = []
  for x in calib:
    float_qjax.append(np.asarray(_float(qmodel, variables, jnp.asarray(x))))
    variables = _calibrate(qmodel, variables, jnp.asarray(x))
  int_vars = convert(qmodel, variables, jnp.asarray(calib[0][:2]))
  return dict(tmodel=tmodel, converted=converted, qmodel=qmodel, int_vars=int_vars,
              float_loaded=np.asarray(float_loaded), float_torch=float_torch,
              float_fused=float_fused, float_qjax=float_qjax, x_eval=x_eval)


def _layer_names(arch):
  return ("fc1", "fc2") if arch == "mlp" else ("conv1", "fc")


def _flatten_of(arch, name):
  return CONV_FLAT if (arch, name) == ("conv", "fc") else None


# ------------------------------------------------------------------------------------------
# Parity with torch's converted models.


@pytest.mark.parametrize("arch", ARCHS)
def test_loaded_float_model_is_torchs_bit_for_bit(arch):
  """The loaded model computes torch's float forward; and the premise of the integer
  comparisons: the model that calibrates (BatchNorm folded) computes torch's fused model's,
  the tensors its observers see, bit for bit on every calibration batch."""
  s = _setup(arch)
  # Flax's BatchNorm multiplies by an rsqrt, which XLA need not round exactly (measured: 0).
  np.testing.assert_allclose(s["float_loaded"], s["float_torch"], rtol=1e-6, atol=1e-6)
  for ours, theirs in zip(s["float_qjax"], s["float_fused"]):
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_view_equals_torchs_converted_model(arch):
  """Weights (int_repr), per-channel scales and zero points, and every activation grid:
  equal, read through `to_torch_view` in torch's layouts and torch's quint8 zero points."""
  s = _setup(arch)
  converted = s["converted"]
  flatten = {"fc": CONV_FLAT} if arch == "conv" else None
  view = interop.to_torch_view(s["int_vars"], activation_spec=QCONFIG.activation.spec,
                               flatten_from=flatten)
  assert set(view) == {"Quantize_0", "Dequantize_0", *_layer_names(arch)}
  assert view["Quantize_0"]["scale"] == converted.quant.scale.item()
  assert view["Quantize_0"]["zero_point"] == converted.quant.zero_point.item()
  producer = "Quantize_0"
  for name in _layer_names(arch):
    module, ours = getattr(converted, name), view[name]
    weight = module.weight()
    np.testing.assert_array_equal(ours["weight"], weight.int_repr().numpy(), err_msg=name)
    assert ours["weight"].dtype == np.int8
    np.testing.assert_array_equal(ours["weight_scale"], weight.q_per_channel_scales().numpy(),
                                  err_msg=name)
    np.testing.assert_array_equal(ours["weight_zero_point"],
                                  weight.q_per_channel_zero_points().numpy(), err_msg=name)
    assert ours["weight_axis"] == weight.q_per_channel_axis() == 0
    assert (ours["scale"], ours["zero_point"]) == (module.scale, module.zero_point), name
    assert (ours["input_scale"], ours["input_zero_point"]) == (
        view[producer]["scale"], view[producer]["zero_point"]), name
    producer = name
  last = getattr(converted, _layer_names(arch)[-1])
  assert (view["Dequantize_0"]["scale"], view["Dequantize_0"]["zero_point"]) == (
      last.scale, last.zero_point)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_outputs_equal_torchs_integers(arch):
  """Each layer fed the integers torch's layer received returns torch's output integers, and
  the whole int8 model torch's integers and dequantized output: 100 % of the entries."""
  s = _setup(arch)
  x = s["x_eval"]
  names = _layer_names(arch)
  captured, final = _torch_int_run(s["converted"], ("quant", *names), x)
  feeds = {name: interop.activation_from_torch(captured[name][0],
                                               flatten_from=_flatten_of(arch, name))
           for name in names}
  (_, fed), (y, chained) = _int8_runs(s["qmodel"], s["int_vars"], jnp.asarray(x), feeds)
  for name in names:
    theirs = captured[name][1].int_repr().numpy()
    for run, outputs in (("fed", fed), ("chained", chained)):
      ours = interop.activation_to_torch(outputs[name])
      assert ours.dtype == np.uint8 and ours.shape == theirs.shape
      mismatched = int(np.sum(ours != theirs))
      assert mismatched == 0, f"{name} ({run}): {mismatched} of {theirs.size} differ"
  np.testing.assert_array_equal(interop.activation_to_torch(chained["Quantize_0"]),
                                captured["quant"][1].int_repr().numpy())
  np.testing.assert_array_equal(np.asarray(y), final)
  # The data exercise the grids: the first layer's outputs reach its zero point (the fused
  # ReLU) and leave the reduce_range grid [0, 127] (stored as quint8, clamped at 255).
  first = captured[names[0]][1].int_repr().numpy()
  assert first.min() == 0 and first.max() > 127  # the ReLU clamp, and beyond [0, 127]


# ------------------------------------------------------------------------------------------
# The NCHW flatten.


def _random_conv_net(seed=0):
  """torch's default init plus a BatchNorm away from identity: generic float weights."""
  torch.manual_seed(seed)
  model = TorchConvNet().eval()
  with torch.no_grad():
    model.bn1.weight.uniform_(0.5, 1.5)
    model.bn1.bias.normal_()
    model.bn1.running_mean.normal_()
    model.bn1.running_var.uniform_(0.5, 2.0)
  return model


def test_flatten_from_permutes_the_linear_columns():
  tmodel = _random_conv_net()
  x = np.random.default_rng(3).normal(size=(4, 14, 14, 1)).astype(F32)
  with torch.no_grad():
    expected = tmodel(_to_torch(x)).numpy()
  model = QConvNet(bn=True)
  target = _shapes(model, x, mode="float")
  state_dict = tmodel.state_dict()

  right = interop.load_state_dict(state_dict, target, flatten_from={"fc": CONV_FLAT})
  np.testing.assert_allclose(_float(model, right, x), expected, rtol=1e-5, atol=1e-5)
  as_is = interop.load_state_dict(state_dict, target, flatten_from={"fc": None})
  assert np.abs(np.asarray(_float(model, as_is, x)) - expected).max() > 0.05
  # The permutation itself: row (h, w, c) of the kernel is column (c, h, w) of the weight.
  w = state_dict["fc.weight"].numpy()
  kernel = np.asarray(right["params"]["fc"]["kernel"])
  c, h, ww = 5, 2, 6
  np.testing.assert_array_equal(kernel[(h * 7 + ww) * 8 + c], w[:, (c * 7 + h) * 7 + ww])


def test_missing_flatten_from_is_refused():
  target = _shapes(QConvNet(bn=True), jnp.zeros((1, 14, 14, 1)), mode="float")
  with pytest.raises(ValueError) as err:
    interop.load_state_dict(_random_conv_net().state_dict(), target)
  message = str(err.value)
  assert "1 problem:" in message  # the flatten alone, not its unfilled leaves too
  assert "flatten_from={'fc': (8, 7, 7)}" in message and "flatten_from={'fc': None}" in message
  assert "392 input features = 8 channels of the conv 'conv1'" in message


def test_flatten_from_shape_must_hold_the_features():
  target = _shapes(QConvNet(bn=True), jnp.zeros((1, 14, 14, 1)), mode="float")
  with pytest.raises(ValueError, match=r"\(8, 6, 6\) \(288 values\).*'fc.weight' has shape "
                                       r"\(10, 392\)"):
    interop.load_state_dict(_random_conv_net().state_dict(), target,
                            flatten_from={"fc": (8, 6, 6)})
  with pytest.raises(ValueError, match="flatten_from names 'conv1', which is not a torch Linear"):
    interop.load_state_dict(_random_conv_net().state_dict(), target,
                            flatten_from={"fc": CONV_FLAT, "conv1": (1, 2)})


# ------------------------------------------------------------------------------------------
# Every key accounted for.


def _mlp_target(**kwargs):
  return _shapes(QMLP(**kwargs), jnp.zeros((1, 784)), mode="float")


def _mlp_state_dict():
  torch.manual_seed(0)
  return TorchMLP().state_dict()


def test_unused_torch_key_is_refused():
  sd = {**_mlp_state_dict(), "head.weight": torch.zeros(3, 10)}
  with pytest.raises(ValueError, match=r"torch keys head.weight \(module 'head'\) are not "
                                       r"loaded: the target has no Flax module at 'head'"):
    interop.load_state_dict(sd, _mlp_target())
  # Dropped on purpose: loads.
  interop.load_state_dict(sd, _mlp_target(), mapping={"head": None})


def test_unfilled_flax_leaf_is_refused():
  sd = _mlp_state_dict()
  del sd["fc2.bias"]
  with pytest.raises(ValueError, match=r"1 target leaf\(s\) not filled by the state_dict: "
                                       r"params/fc2/bias\."):
    interop.load_state_dict(sd, _mlp_target())
  target = _mlp_target()
  loaded = interop.load_state_dict(sd, target, keep=["fc2/bias"])
  assert loaded["params"]["fc2"]["bias"] is target["params"]["fc2"]["bias"]
  assert loaded["quant_stats"] is target["quant_stats"]  # passed through


def test_shape_mismatch_names_key_path_and_both_shapes():
  class Wider(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10, name="fc2")(nn.Dense(100, name="fc1")(x))

  target = _shapes(Wider(), jnp.zeros((1, 785)))
  with pytest.raises(ValueError) as err:
    interop.load_state_dict(_mlp_state_dict(), target)
  message = str(err.value)
  assert ("shape mismatch: torch 'fc1.weight' (100, 784) gives a Dense kernel (in, out) = "
          "weight.T of shape (784, 100), but params/fc1/kernel has shape (785, 100); that is a "
          "torch shape of (100, 785)") in message
  assert message.startswith("load_state_dict: 1 problem:")  # not also "not filled"


def test_all_problems_are_listed_at_once():
  sd = {**_mlp_state_dict(), "extra.weight": torch.zeros(2, 2)}
  del sd["fc1.bias"]
  with pytest.raises(ValueError, match=r"2 problems:\n  - .*extra\.weight.*\n  - .*"
                                       r"params/fc1/bias"):
    interop.load_state_dict(sd, _mlp_target())


def test_state_dicts_of_prepared_or_converted_models_are_refused():
  prepared = TorchMLP().eval()
  prepared.qconfig = tq.get_default_qconfig("fbgemm")
  tq.prepare(prepared, inplace=True)
  with torch.no_grad():
    prepared(torch.zeros(2, 784))
  with pytest.raises(ValueError, match="buffers of a prepared model .* pass the float model's"):
    interop.load_state_dict(prepared.state_dict(), _mlp_target())
  quantized = {**_mlp_state_dict(), "fc2.weight": torch.quantize_per_tensor(
      torch.zeros(10, 100), 0.1, 0, torch.qint8)}
  with pytest.raises(ValueError, match="'fc2.weight' is a quantized tensor"):
    interop.load_state_dict(quantized, _mlp_target())


# ------------------------------------------------------------------------------------------
# Names, layers and layouts.


def test_mapping_renames_and_sequential_indices():
  """A torch Sequential's "layers.0" is Flax's list attribute "layers_0"; a mapping prefix
  renames a whole subtree, a longer key wins, "" is the root."""
  torch.manual_seed(1)
  tmodel = torch.nn.Sequential()
  tmodel.add_module("body", torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(),
                                                torch.nn.Linear(6, 6)))
  tmodel.add_module("head", torch.nn.Linear(6, 2))

  class Net(nn.Module):
    def setup(self):
      self.layers = [nn.Dense(6), nn.Dense(6)]
      self.out = nn.Dense(2)

    def __call__(self, x):
      return self.out(self.layers[1](nn.relu(self.layers[0](x))))

  target = _shapes(Net(), jnp.zeros((1, 4)))
  # body.0 -> layers_0, body.2 -> layers_1, head -> out
  loaded = interop.load_state_dict(tmodel.state_dict(), target,
                                   mapping={"body": "layers", "body.2": "layers_1",
                                            "head": "out"})
  x = np.random.default_rng(0).normal(size=(3, 4)).astype(F32)
  np.testing.assert_allclose(jax.jit(Net().apply)(loaded, x),
                             tmodel(torch.from_numpy(x)).detach(),
                             rtol=1e-6, atol=1e-6)
  wrapped = {f"module.{k}": v for k, v in tmodel.state_dict().items()}  # DataParallel's
  with pytest.raises(ValueError, match="no Flax module at 'layers/2' or 'layers_2'"):
    interop.load_state_dict(wrapped, target, mapping={"module.body": "layers",
                                                      "module.head": "out"})


def test_conv1d_batchnorm1d_flatten_and_abstract_target():
  """Conv1d (O, I, k) -> (k, I, O), BatchNorm1d statistics into batch_stats (its
  num_batches_tracked consumed), a (C, L) flatten; the target may be jax.eval_shape's."""
  torch.manual_seed(2)
  tmodel = torch.nn.Sequential(torch.nn.Conv1d(3, 5, 3, groups=1), torch.nn.BatchNorm1d(5),
                               torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(5 * 6, 4),
                               torch.nn.BatchNorm1d(4)).eval()
  with torch.no_grad():
    for bn in (tmodel[1], tmodel[5]):
      bn.running_mean.normal_()
      bn.running_var.uniform_(0.5, 2)
      bn.weight.uniform_(0.5, 1.5)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(5, (3,), padding="VALID", name="conv")(x)
      x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(x))
      x = nn.Dense(4, name="fc")(x.reshape((x.shape[0], -1)))
      return nn.BatchNorm(use_running_average=True, name="bn_out")(x)

  target = _shapes(Net(), jnp.zeros((1, 8, 3)))
  loaded = interop.load_state_dict(
      tmodel.state_dict(), target, flatten_from={"4": (5, 6)},
      mapping={"0": "conv", "1": "bn", "4": "fc", "5": "bn_out"})
  assert loaded["batch_stats"]["bn"]["var"].shape == (5,)
  x = np.random.default_rng(1).normal(size=(2, 8, 3)).astype(F32)
  with torch.no_grad():
    expected = tmodel(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1)))).numpy()
  np.testing.assert_allclose(jax.jit(Net().apply)(loaded, x), expected, rtol=1e-5, atol=1e-5)


def test_batchnorm_into_quant_conv_bn():
  """conv1 + bn1 mapped onto one QuantConvBN: the folded kernel and bias convert would use are
  torch's fuse_conv_bn_weights of the same modules."""
  tmodel = _random_conv_net()

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = qnn.QuantConvBN(8, (3, 3), padding=1, qconfig=QCONFIG, name="conv1")(
          x, mode="float", train=False)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      return nn.Dense(10, name="fc")(x.reshape((x.shape[0], -1)))

  target = _shapes(Net(), jnp.zeros((1, 14, 14, 1)))
  loaded = interop.load_state_dict(tmodel.state_dict(), target, mapping={"bn1": "conv1"},
                                   flatten_from={"fc": CONV_FLAT})
  kernel, bias = qjax.folded_kernel_and_bias(loaded["params"]["conv1"],
                                             loaded["batch_stats"]["conv1"], epsilon=EPS)
  bn = tmodel.bn1
  w, b = fuse_conv_bn_weights(tmodel.conv1.weight, None, bn.running_mean, bn.running_var,
                              bn.eps, bn.weight, bn.bias)
  np.testing.assert_array_equal(np.asarray(kernel), w.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(bias), b.detach().numpy())


class _StackedLSTM(nn.Module):
  """Two nn.RNN layers as a list attribute: params rnn_0/cell, rnn_1/cell."""

  cell: type
  hidden: int

  def setup(self):
    self.rnn = [nn.RNN(self.cell(self.hidden)) for _ in range(2)]

  def __call__(self, x):
    for layer in self.rnn:
      x = layer(x)
    return x


class _BiGRU(nn.Module):
  """nn.Bidirectional built in setup: rnn/forward_rnn/cell, rnn/backward_rnn/cell."""

  hidden: int

  def setup(self):
    self.rnn = nn.Bidirectional(nn.RNN(nn.GRUCell(self.hidden)),
                                nn.RNN(nn.GRUCell(self.hidden)))

  def __call__(self, x):
    return self.rnn(x)


class _Simple(nn.Module):
  """A compact module: the cell is named, or Flax would bind it here as SimpleCell_0."""

  hidden: int

  @nn.compact
  def __call__(self, x):
    return nn.RNN(nn.SimpleCell(self.hidden, name="rnn"))(x)


@pytest.mark.parametrize("kind", ["lstm", "optimized_lstm", "gru", "rnn"])
def test_recurrent_layers(kind):
  """torch LSTM (2 layers), GRU (bidirectional) and RNN into Flax cells by default names: the
  float outputs agree to float rounding (Flax sums b_ih + b_hh once, torch adds each)."""
  torch.manual_seed(3)
  n_in, hidden = 5, 6
  if kind in ("lstm", "optimized_lstm"):
    trnn = torch.nn.LSTM(n_in, hidden, num_layers=2, batch_first=True)
    model = _StackedLSTM(nn.LSTMCell if kind == "lstm" else nn.OptimizedLSTMCell, hidden)
  elif kind == "gru":
    trnn = torch.nn.GRU(n_in, hidden, batch_first=True, bidirectional=True)
    model = _BiGRU(hidden)
  else:
    trnn = torch.nn.RNN(n_in, hidden, batch_first=True)
    model = _Simple(hidden)
  state_dict = {f"rnn.{k}": v for k, v in trnn.state_dict().items()}
  x = np.random.default_rng(4).normal(size=(3, 7, n_in)).astype(F32)
  target = _shapes(model, x)
  loaded = interop.load_state_dict(state_dict, target)
  with torch.no_grad():
    expected = trnn(torch.from_numpy(x))[0].numpy()
  np.testing.assert_allclose(jax.jit(model.apply)(loaded, x), expected, rtol=1e-5, atol=2e-6)


def test_recurrent_gate_count_mismatch_is_refused():
  sd = {f"rnn.{k}": v for k, v in torch.nn.GRU(5, 6, batch_first=True).state_dict().items()}
  cell = _shapes(nn.RNN(nn.LSTMCell(6)), jnp.zeros((1, 2, 5)))
  variables = {"params": {"rnn": cell["params"]}}
  with pytest.raises(ValueError, match="is the torch module a LSTM"):
    interop.load_state_dict(sd, variables)


# ------------------------------------------------------------------------------------------
# Activations and views.


def test_activation_round_trip_and_layouts():
  rng = np.random.default_rng(5)
  q8 = rng.integers(-128, 128, size=(2, 3, 4, 5)).astype(np.int8)  # NHWC
  torch_view = interop.activation_to_torch(q8)
  assert torch_view.dtype == np.uint8 and torch_view.shape == (2, 5, 3, 4)
  np.testing.assert_array_equal(torch_view, (q8.astype(int) + 128).transpose(0, 3, 1, 2))
  np.testing.assert_array_equal(interop.activation_from_torch(torch_view), q8)
  flat = q8.reshape(2, -1)  # flattened (h, w, c)
  as_torch = interop.activation_to_torch(flat, flatten_from=(5, 3, 4))
  np.testing.assert_array_equal(as_torch, torch_view.reshape(2, -1))
  np.testing.assert_array_equal(interop.activation_from_torch(as_torch, flatten_from=(5, 3, 4)),
                                flat)
  qint8 = QCONFIG.weight.spec  # a signed 8-bit grid: no shift
  np.testing.assert_array_equal(interop.activation_to_torch(flat, spec=qint8), flat)
  with pytest.raises(ValueError, match="rank-3 activation"):
    interop.activation_to_torch(q8[0])
  quantized = torch.quantize_per_tensor(torch.rand(2, 3, 4, 5), 0.01, 7, torch.quint8)
  np.testing.assert_array_equal(
      interop.activation_from_torch(quantized),
      quantized.int_repr().numpy().transpose(0, 2, 3, 1).astype(int) - 128)


def test_torch_view_refuses_serving_trees_and_foreign_grids():
  s = _setup("mlp")
  with pytest.raises(ValueError, match="for_serving tree"):
    interop.to_torch_view(for_serving(s["int_vars"]))
  with pytest.raises(ValueError, match="torch's quantized activations are 8-bit"):
    interop.to_torch_view(s["int_vars"], activation_spec=qjax.QuantSpec(bits=4, signed=False))
  # Zero points are shifted by the spec's int8_shift and must land on its grid.
  grid = DequantizeOp(scale=jnp.float32(0.1), zero_point=jnp.int32(-5))
  qint8 = qjax.QuantSpec(bits=8, signed=True)
  assert interop.to_torch_view({"converted": {"q": {"op": grid}}})["q"]["zero_point"] == 123
  assert interop.to_torch_view({"converted": {"q": {"op": grid}}}, activation_spec=qint8)["q"][
      "zero_point"] == -5
  bad = {"converted": {"q": {"op": DequantizeOp(scale=jnp.float32(0.1),
                                                zero_point=jnp.int32(200))}}}
  with pytest.raises(ValueError, match=r"q: zero point 328 is outside \[0, 255\]"):
    interop.to_torch_view(bad)
