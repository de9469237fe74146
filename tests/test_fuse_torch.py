"""BatchNorm folding and folded-BatchNorm QAT against PyTorch 2.13 (CPU).

* `fold_batch_norm` equals `torch.nn.utils.fusion.fuse_conv_bn_weights` (Conv1d/2d/3d
  kernels) and `fuse_linear_bn_weights` bit for bit, jitted or not; `fold_batch_norms` on a
  conv-bn-relu model gives the weights of `torch.ao.quantization.fuse_modules` in eval mode.
* `QuantConvBN` / `QuantDenseBN` against torch's QAT `ConvBn2d`, `ConvBnReLU2d` and
  `LinearBn1d` (`fuse_modules_qat` + `prepare_qat` with the version-0 x86 QAT qconfig, whose
  FakeQuantize fake-quantizes with its observer's qparams as qjax does; see
  tests/test_nn_torch.py): over train steps with SGD updates (torch's new parameters are
  copied into qjax after each step, so both sides always start a step from the same
  weights), then a step with frozen BatchNorm statistics (`freeze_bn_stats` == train=False),
  then eval with observers off. Outputs, running mean / variance, both observers' states,
  and the gradients with respect to the input and every parameter must agree.

Tolerances. The folding is bit-exact. In the layers, the convolutions and the batch
statistics are sums that XLA and oneDNN order differently, so values agree to float32
rounding; the weight observer, which sees W * s elementwise, agrees bit for bit while the
running variance is still the same on both sides (the first step). A float32 difference can
move a fake-quantized output across a rounding boundary: `_assert_fake_quantized_close`
allows that for a rare entry, by one quantization step at most.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import qjax.nn as qnn  # noqa: E402
from qjax.fuse import fold_batch_norm, fold_batch_norms  # noqa: E402
from qjax.nn.fused import QuantConvBN, QuantDenseBN  # noqa: E402

from torch.ao import quantization as tq  # noqa: E402
from torch.ao.nn.intrinsic import qat as nniqat  # noqa: E402
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights  # noqa: E402


F32 = np.float32


def _to_torch_kernel(kernel):
  """Flax (..., in, out) -> torch (out, in, ...); (in, out) -> (out, in)."""
  k = np.asarray(kernel)
  return np.ascontiguousarray(np.moveaxis(np.moveaxis(k, -1, 0), -1, 1))


def _from_torch_kernel(weight):
  w = weight.detach().numpy() if hasattr(weight, "detach") else weight
  return np.moveaxis(np.moveaxis(w, 1, -1), 0, -1)


def _bits(a):
  return np.asarray(a).view(np.uint32)


# ------------------------------------------------------------------------------------------
# Pure folding.


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("shape, use_bias, affine", [
    ((24, 32), True, True), ((24, 32), False, True),
    ((5, 8, 32), True, True), ((3, 3, 8, 32), False, True), ((3, 3, 8, 32), True, False),
    ((2, 3, 3, 4, 16), True, True)],
    ids=["linear", "linear_no_bias", "conv1d", "conv2d_no_bias", "conv2d_bn_no_affine",
         "conv3d"])
def test_fold_batch_norm_is_torch_bit_for_bit(shape, use_bias, affine, jit):
  rng = np.random.default_rng(0)
  c = shape[-1]
  kernel = rng.normal(size=shape).astype(F32)
  bias = rng.normal(size=c).astype(F32) if use_bias else None
  gamma = rng.uniform(-2, 2, c).astype(F32) if affine else None
  beta = rng.normal(size=c).astype(F32) if affine else None
  mean, var = rng.normal(size=c).astype(F32), rng.uniform(0, 5, c).astype(F32)
  fold = functools.partial(fold_batch_norm, epsilon=1e-5)
  fold = jax.jit(fold) if jit else fold
  k, b = fold(kernel, bias, scale=gamma, offset=beta, mean=mean, var=var)
  t = lambda a: None if a is None else torch.from_numpy(a)
  if len(shape) == 2:  # torch's linear fusion takes no None gamma / beta
    tw, tb = fuse_linear_bn_weights(
        t(_to_torch_kernel(kernel)), t(bias), t(mean), t(var), 1e-5,
        t(np.ones(c, F32) if gamma is None else gamma),
        t(np.zeros(c, F32) if beta is None else beta))
  else:
    tw, tb = fuse_conv_bn_weights(t(_to_torch_kernel(kernel)), t(bias), t(mean), t(var),
                                  1e-5, t(gamma), t(beta))
  np.testing.assert_array_equal(_bits(k), _bits(_from_torch_kernel(tw)))
  np.testing.assert_array_equal(_bits(b), _bits(tb.detach().numpy()))


class TorchConvBnReLU(torch.nn.Module):
  """conv1 (no bias) + bn1 + relu1, then conv2 (bias) + bn2, NCHW."""

  def __init__(self):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    self.bn1, self.relu1 = torch.nn.BatchNorm2d(4), torch.nn.ReLU()
    self.conv2 = torch.nn.Conv2d(4, 5, 3)
    self.bn2 = torch.nn.BatchNorm2d(5)

  def forward(self, x):
    return self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))


class FlaxConvBnReLU(nn.Module):
  fold_bn: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), strides=2, padding=1, use_bias=self.fold_bn, name="conv1")(x)
    if not self.fold_bn:
      x = nn.BatchNorm(use_running_average=True, name="bn1")(x)
    x = nn.Conv(5, (3, 3), padding="VALID", name="conv2")(nn.relu(x))
    if not self.fold_bn:
      x = nn.BatchNorm(use_running_average=True, name="bn2")(x)
    return x


def test_fold_batch_norms_is_torch_fuse_modules():
  """fuse_modules(eval) folds each BatchNorm into its conv; fold_batch_norms on the same
  variables gives the same weights bit for bit, and the folded Flax model torch's output."""
  torch.manual_seed(0)
  rng = np.random.default_rng(1)
  tmodel = TorchConvBnReLU()
  with torch.no_grad():
    for bn in (tmodel.bn1, tmodel.bn2):
      c = bn.num_features
      bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, c).astype(F32)))
      bn.bias.copy_(torch.from_numpy(rng.normal(size=c).astype(F32)))
      bn.running_mean.copy_(torch.from_numpy(rng.normal(size=c).astype(F32)))
      bn.running_var.copy_(torch.from_numpy(rng.uniform(0.2, 3, c).astype(F32)))
  tmodel.eval()
  t = lambda a: a.detach().numpy()
  variables = {
      "params": {"conv1": {"kernel": _from_torch_kernel(tmodel.conv1.weight)},
                 "conv2": {"kernel": _from_torch_kernel(tmodel.conv2.weight),
                           "bias": t(tmodel.conv2.bias)},
                 **{name: {"scale": t(getattr(tmodel, name).weight),
                           "bias": t(getattr(tmodel, name).bias)} for name in ("bn1", "bn2")}},
      "batch_stats": {name: {"mean": t(getattr(tmodel, name).running_mean),
                             "var": t(getattr(tmodel, name).running_var)}
                      for name in ("bn1", "bn2")}}
  x = rng.normal(size=(2, 9, 9, 3)).astype(F32)
  with torch.no_grad():
    expected = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  fused = tq.fuse_modules(tmodel, [["conv1", "bn1", "relu1"], ["conv2", "bn2"]])
  # The fold and the folded model's forward compiled as one program (fold_batch_norm is
  # torch's bit for bit eagerly as well: test_fold_batch_norm_is_torch_bit_for_bit).
  @jax.jit
  def fold_and_apply(variables, x):
    folded = fold_batch_norms(variables, [("conv1", "bn1"), ("conv2", "bn2")])
    return folded, FlaxConvBnReLU(fold_bn=True).apply(folded, x)

  folded, got = fold_and_apply(variables, x)
  for name, torch_conv in (("conv1", fused.conv1[0]), ("conv2", fused.conv2)):
    np.testing.assert_array_equal(_bits(folded["params"][name]["kernel"]),
                                  _bits(_from_torch_kernel(torch_conv.weight)), err_msg=name)
    np.testing.assert_array_equal(_bits(folded["params"][name]["bias"]),
                                  _bits(torch_conv.bias.detach().numpy()), err_msg=name)
  np.testing.assert_allclose(np.asarray(got), expected.transpose(0, 2, 3, 1), rtol=1e-5,
                             atol=1e-5)


# ------------------------------------------------------------------------------------------
# QAT: QuantConvBN / QuantDenseBN against ConvBn2d / ConvBnReLU2d / LinearBn1d.


class TorchLayerBN(torch.nn.Module):
  """A conv (or linear) + BatchNorm (+ ReLU), to be fused by fuse_modules_qat."""

  def __init__(self, kind, relu, bias):
    super().__init__()
    if kind == "conv":
      self.layer = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=bias)
      self.bn = torch.nn.BatchNorm2d(6)
    else:
      self.layer = torch.nn.Linear(10, 6, bias=bias)
      self.bn = torch.nn.BatchNorm1d(6)
    self.relu = torch.nn.ReLU() if relu else None

  def forward(self, x):
    x = self.bn(self.layer(x))
    return x if self.relu is None else self.relu(x)


def _torch_qat(kind, relu, bias, seed):
  torch.manual_seed(seed)
  rng = np.random.default_rng(seed)
  model = TorchLayerBN(kind, relu, bias).train()
  with torch.no_grad():  # a BatchNorm scale away from 1 (torch's QAT modules draw U(0, 1))
    model.bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, 6).astype(F32)))
    model.bn.bias.copy_(torch.from_numpy((rng.normal(size=6) * 0.1).astype(F32)))
  tq.fuse_modules_qat(model, [["layer", "bn", "relu"] if relu else ["layer", "bn"]],
                      inplace=True)
  model.qconfig = tq.get_default_qat_qconfig("x86", version=0)
  tq.prepare_qat(model, inplace=True)
  expected = {("conv", True): nniqat.ConvBnReLU2d, ("conv", False): nniqat.ConvBn2d,
              ("dense", False): nniqat.LinearBn1d}[kind, relu]
  assert type(model.layer) is expected  # premise: torch built the module we compare with
  return model


def _qjax_layer(kind, relu, bias):
  qconfig = qnn.get_default_qat_qconfig("x86")
  activation = nn.relu if relu else None
  if kind == "conv":
    return QuantConvBN(6, (3, 3), strides=2, padding=1, use_bias=bias, qconfig=qconfig,
                       activation=activation, momentum=0.9, epsilon=1e-5)
  return QuantDenseBN(6, use_bias=bias, qconfig=qconfig, activation=activation)


def _torch_params(layer):
  """The torch QAT module's parameters in qjax's layout (NumPy copies)."""
  params = {"kernel": np.array(_from_torch_kernel(layer.weight)),
            "bn_scale": layer.bn.weight.detach().numpy().copy(),
            "bn_bias": layer.bn.bias.detach().numpy().copy()}
  if layer.bias is not None:
    params["bias"] = layer.bias.detach().numpy().copy()
  return params


def _torch_grads(layer):
  grads = {"kernel": _from_torch_kernel(layer.weight.grad),
           "bn_scale": layer.bn.weight.grad.numpy(), "bn_bias": layer.bn.bias.grad.numpy()}
  if layer.bias is not None:
    grads["bias"] = layer.bias.grad.numpy()
  return grads


def _nhwc(a, kind):
  return a.transpose(0, 2, 3, 1) if kind == "conv" else a


def _nchw(a, kind):
  return np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if kind == "conv" else a


def _assert_fake_quantized_close(got, expected, step, what):
  """Equal to float32 rounding, except that a rare entry may sit one grid step away."""
  diff = np.abs(np.asarray(got) - expected)
  far = diff > 1e-5 * max(1.0, float(np.max(np.abs(expected))))
  assert diff.max() <= step * 1.001, (what, diff.max(), step)
  assert far.mean() <= 0.01, (what, far.mean())


def _assert_grads_close(got, expected, what):
  """Close relative to the gradient's magnitude; at least to 2e-5 absolute, as the gradient
  of a bias followed by a training-mode BatchNorm is 0 up to rounding on both sides."""
  scale = max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=2e-5 * scale,
                             err_msg=what)


def _assert_observer(stats, torch_observer, what, exact=False):
  for name in ("min_val", "max_val"):
    ours, theirs = np.asarray(stats[name]), getattr(torch_observer, name).numpy()
    if exact:
      np.testing.assert_array_equal(_bits(ours), _bits(theirs), err_msg=f"{what} {name}")
    else:
      np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, err_msg=f"{what} {name}")


def _compare_qat(kind, relu, bias, steps=3, seed=0):
  """The run described in the module docstring; asserts at every step."""
  tmodel = _torch_qat(kind, relu, bias, seed)
  tlayer = tmodel.layer
  layer = _qjax_layer(kind, relu, bias)
  rng = np.random.default_rng(seed + 100)
  in_shape, out_shape = ((8, 10, 10, 3), (8, 5, 5, 6)) if kind == "conv" else ((16, 10),
                                                                                (16, 6))
  # The initial observer and BatchNorm states (the params come from torch: their random
  # initializers are not compiled).
  init = jax.jit(lambda key, x: {
      k: v for k, v in layer.init(key, x, train=False, mode="qat").items() if k != "params"})
  variables = init(jax.random.key(0), np.zeros(in_shape, F32))
  stats, batch_stats = variables["quant_stats"], variables["batch_stats"]

  @functools.partial(jax.jit, static_argnames="train")
  def qjax_step(params, x, stats, batch_stats, upstream, train):
    def loss(params, x):
      y, updates = layer.apply(
          {"params": params, "quant_stats": stats, "batch_stats": batch_stats}, x,
          train=train, mode="qat", mutable=["quant_stats", "batch_stats"])
      return jnp.sum(y * upstream), (y, updates)
    return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

  optimizer = torch.optim.SGD(tmodel.parameters(), lr=0.05)
  phases = ["train"] * steps + ["frozen_bn"]
  for i, phase in enumerate(phases):
    if phase == "frozen_bn":
      # The module's own method: torch's nniqat.freeze_bn_stats helper skips LinearBn1d.
      tlayer.freeze_bn_stats()
      before = (np.asarray(batch_stats["mean"]), tlayer.bn.running_mean.numpy().copy())
    params = _torch_params(tlayer)
    x = (rng.normal(size=in_shape) * (1 + i) + 0.2 * i).astype(F32)
    upstream = rng.normal(size=out_shape).astype(F32)
    xt = torch.from_numpy(_nchw(x, kind)).requires_grad_(True)
    optimizer.zero_grad()
    yt = tmodel(xt)
    (yt * torch.from_numpy(_nchw(upstream, kind))).sum().backward()
    (grads, grad_x), (y, updates) = qjax_step(params, x, stats, batch_stats, upstream,
                                              phase == "train")
    stats, batch_stats = updates["quant_stats"], updates["batch_stats"]
    what = f"{kind} relu={relu} bias={bias} step {i} ({phase})"
    out_fq = tlayer.activation_post_process
    _assert_fake_quantized_close(y, _nhwc(yt.detach().numpy(), kind), float(out_fq.scale),
                                 f"{what} output")
    np.testing.assert_allclose(batch_stats["mean"], tlayer.bn.running_mean.numpy(),
                               rtol=1e-5, atol=1e-6, err_msg=f"{what} running mean")
    np.testing.assert_allclose(batch_stats["var"], tlayer.bn.running_var.numpy(), rtol=1e-5,
                               err_msg=f"{what} running var")
    _assert_observer(stats["weight"], tlayer.weight_fake_quant.activation_post_process,
                     f"{what} weight observer", exact=i == 0)
    _assert_observer(stats["output"], out_fq.activation_post_process, f"{what} output observer")
    _assert_grads_close(grad_x, _nhwc(xt.grad.numpy(), kind), f"{what} d/dx")
    for name, expected in _torch_grads(tlayer).items():
      _assert_grads_close(grads[name], expected, f"{what} d/d{name}")
    optimizer.step()
  # The running averages did not move in the frozen step, on either side.
  np.testing.assert_array_equal(before[0], batch_stats["mean"])
  np.testing.assert_array_equal(before[1], tlayer.bn.running_mean.numpy())
  # Eval: torch in eval with observers off; qjax with immutable statistics.
  tmodel.eval()
  tmodel.apply(tq.disable_observer)
  x = rng.normal(size=in_shape).astype(F32)
  with torch.no_grad():
    yt = tmodel(torch.from_numpy(_nchw(x, kind))).numpy()
  y = jax.jit(functools.partial(layer.apply, train=False, mode="qat"))(
      {"params": _torch_params(tlayer), "quant_stats": stats, "batch_stats": batch_stats}, x)
  _assert_fake_quantized_close(y, _nhwc(yt, kind),
                               float(tlayer.activation_post_process.scale), "eval output")


@pytest.mark.parametrize("relu, bias", [(False, False), (True, False), (True, True)],
                         ids=["ConvBn2d", "ConvBnReLU2d", "ConvBnReLU2d_bias"])
def test_quant_conv_bn_matches_torch_qat(relu, bias):
  _compare_qat("conv", relu, bias)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_quant_dense_bn_matches_torch_linear_bn(bias):
  _compare_qat("dense", False, bias)
