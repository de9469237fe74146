"""qjax.dynamic against PyTorch's x86 dynamic quantization (torch.ao quantize_dynamic).

Bit for bit: the activation qparams (torch._choose_qparams_per_tensor), the quantized
activations (torch.quantize_per_tensor_dynamic), dynamic Linear layers and the MNIST MLP
784-100-100-10. The LSTM matches to float rounding one step at a time; over a sequence torch
quantizes the input projection of all time steps at once, which Flax's per-step cell cannot
do, and the residual that leaves is measured here.
"""

from __future__ import annotations

import functools
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import QuantSpec, dynamic, numerics

from support import cases
from support import reference

torch = pytest.importorskip("torch")

F32 = np.float32
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*torch.ao.quantization is deprecated"),
    pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions"),
]


@pytest.fixture(autouse=True)
def x86_engine():
  if "x86" not in torch.backends.quantized.supported_engines:
    pytest.skip("PyTorch was built without the x86 (fbgemm) quantized engine")
  previous = torch.backends.quantized.engine
  torch.backends.quantized.engine = "x86"
  yield
  torch.backends.quantized.engine = previous


def _torch_dynamic(module: torch.nn.Module, types, qconfig=None) -> torch.nn.Module:
  spec = dict.fromkeys(types, qconfig) if qconfig is not None else set(types)
  return torch.ao.quantization.quantize_dynamic(module, spec, dtype=torch.qint8)


# ------------------------------------------------------------------------------------------
# Qparams and quantized activations.


@pytest.mark.parametrize("reduce_range", [True, False])
def test_choose_qparams_matches_torch(reduce_range):
  ranges = cases.fbgemm_qparams_ranges(0, 1800)
  q = 127 if reduce_range else 255
  # Below this the scale is subnormal; XLA:CPU flushes it (documented, checked below).
  normal = (ranges[:, 1].astype(np.float64) - ranges[:, 0]) / q >= np.finfo(F32).tiny
  lo, hi = ranges[normal, 0], ranges[normal, 1]
  scale, zero_point = cases.batched_choose_qparams(reduce_range)(lo, hi)
  expected = [torch._choose_qparams_per_tensor(torch.tensor([a, b]), reduce_range)
              for a, b in zip(lo, hi, strict=True)]
  np.testing.assert_array_equal(np.asarray(scale), np.array([F32(s) for s, _ in expected]))
  np.testing.assert_array_equal(np.asarray(zero_point), np.array([z for _, z in expected]))


def test_subnormal_scale_divergence_is_as_documented():
  # max - min = 1e-36: S = 7.9e-39 is subnormal, 1/S does not overflow, so fbgemm stretches
  # it to 6.1e-5; XLA:CPU flushes S to 0 and qjax takes the 0.1 fallback. At 2e-37, 1/S
  # overflows and both give 0.1.
  for bound, torch_scale in ((5e-37, reference.FBGEMM_SMALL_SCALE), (1e-37, F32(0.1))):
    scale, _ = torch._choose_qparams_per_tensor(torch.tensor([-bound, bound]), True)
    assert F32(scale) == torch_scale
    assert float(dynamic.choose_qparams(-bound, bound).scale) == float(F32(0.1))


@pytest.mark.parametrize("reduce_range", [True, False])
def test_quantize_activation_matches_torch(reduce_range):
  rng = np.random.default_rng(1)
  for trial in range(12):
    shape = ((7,), (3, 33), (2, 5, 9))[trial % 3]      # few shapes: few compilations
    x = (rng.normal(size=shape) * 10.0 ** rng.uniform(-4, 3) + rng.normal()).astype(F32)
    if trial % 4 == 0:
      x = np.maximum(x, 0)                   # ReLU outputs: min == 0
    expected = torch.quantize_per_tensor_dynamic(torch.from_numpy(x), torch.quint8,
                                                 reduce_range)
    got = dynamic.quantize_activation(x, reduce_range=reduce_range)
    np.testing.assert_array_equal(np.asarray(got.qvalue), expected.int_repr().numpy())
    assert (F32(got.scale), int(got.zero_point)) == (F32(expected.q_scale()),
                                                     expected.q_zero_point())


# ------------------------------------------------------------------------------------------
# Linear layers.


def _report(got, expected) -> str:
  diff = np.abs(np.asarray(got, np.float64) - expected)
  return f"max |diff| {diff.max():.3g}, {int((diff > 0).sum())} of {diff.size} entries differ"


@pytest.mark.parametrize("per_channel", [False, True])
def test_linear_matches_torch_module(per_channel):
  rng = np.random.default_rng(2)
  qconfig = (torch.ao.quantization.per_channel_dynamic_qconfig if per_channel
             else torch.ao.quantization.default_dynamic_qconfig)
  for m, k, n in ((1, 13, 5), (64, 257, 10)):
    torch.manual_seed(m * k)
    float_model = torch.nn.Sequential(torch.nn.Linear(k, n))
    qmodel = _torch_dynamic(float_model, [torch.nn.Linear], qconfig)
    kernel = float_model[0].weight.detach().numpy().T
    dk = dynamic.quantize_kernel(kernel, per_channel=per_channel)
    weight = qmodel[0].weight()
    np.testing.assert_array_equal(np.asarray(dk.qweight.qvalue), weight.int_repr().numpy())
    x = (rng.normal(size=(m, k)) * 2 + 0.5).astype(F32)
    expected = qmodel(torch.from_numpy(x)).detach().numpy()
    got = dynamic.dynamic_dense(x, dk, float_model[0].bias.detach().numpy())
    assert np.array_equal(np.asarray(got), expected), _report(got, expected)


@pytest.mark.parametrize("per_channel", [False, True])
def test_linear_without_reduce_range_matches_fbgemm(per_channel):
  rng = np.random.default_rng(3)
  for m, k, n in ((19, 831, 3),):    # N = 3: where XLA's own FMA contraction failed
    weight = rng.normal(size=(n, k)).astype(F32)
    bias = rng.normal(size=n).astype(F32)
    dk = dynamic.quantize_kernel(weight.T, per_channel=per_channel, reduce_range=False)
    scale = np.asarray(dk.qweight.scale)
    if per_channel:
      w_q = torch.quantize_per_channel(torch.from_numpy(weight), torch.tensor(scale).double(),
                                       torch.zeros(n, dtype=torch.long), 0, torch.qint8)
    else:
      w_q = torch.quantize_per_tensor(torch.from_numpy(weight), float(scale), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(w_q, torch.from_numpy(bias))
    x = (rng.normal(size=(m, k)) * 3).astype(F32)
    expected = torch.ops.quantized.linear_dynamic(torch.from_numpy(x), packed,
                                                  reduce_range=False).numpy()
    got = dynamic.dynamic_dense(x, dk, bias)
    assert np.array_equal(np.asarray(got), expected), _report(got, expected)


class MnistMLP(nn.Module):
  """The MNIST MLP, 784-100-100-10 with ReLU."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(100)(x))
    x = nn.relu(nn.Dense(100)(x))
    return nn.Dense(10)(x)


@functools.cache
def _seed_mlp(per_channel):
  """(torch's dynamic MLP, qjax's dynamic variables) for `per_channel`, built once per file."""
  torch.manual_seed(0)
  float_model = torch.nn.Sequential(torch.nn.Linear(784, 100), torch.nn.ReLU(),
                                    torch.nn.Linear(100, 100), torch.nn.ReLU(),
                                    torch.nn.Linear(100, 10))
  qconfig = (torch.ao.quantization.per_channel_dynamic_qconfig if per_channel
             else torch.ao.quantization.default_dynamic_qconfig)
  qmodel = _torch_dynamic(float_model, [torch.nn.Linear], qconfig)
  params = {f"Dense_{i}": {"kernel": float_model[2 * i].weight.detach().numpy().T,
                           "bias": float_model[2 * i].bias.detach().numpy()}
            for i in range(3)}
  return qmodel, {"params": dynamic.quantize_dynamic(params, per_channel=per_channel)}


_MLP_APPLY = jax.jit(lambda v, x: dynamic.dynamic_apply(MnistMLP(), v, x))


@pytest.mark.parametrize("per_channel, batch", [
    (False, 1), (False, 64), (True, 64),
    # Another compilation for a batch size that adds no new case; runs with -m slow.
    pytest.param(False, 1024, marks=pytest.mark.slow),
])
def test_seed_mlp_matches_torch(per_channel, batch):
  qmodel, variables = _seed_mlp(per_channel)
  rng = np.random.default_rng(4 + batch)
  x = rng.random((batch, 784), dtype=F32)           # MNIST-like pixels in [0, 1)
  expected = qmodel(torch.from_numpy(x)).detach().numpy()
  got = _MLP_APPLY(variables, x)
  assert np.array_equal(np.asarray(got), expected), f"batch {batch}: {_report(got, expected)}"


# ------------------------------------------------------------------------------------------
# LSTM: torch.nn.LSTM (1 layer, batch_first) against nn.RNN(nn.LSTMCell).

INPUT, HIDDEN, BATCH = 12, 16, 5


class _Wrap(torch.nn.Module):
  """quantize_dynamic swaps children only: the LSTM must not be the root module."""

  def __init__(self, lstm):
    super().__init__()
    self.lstm = lstm

  def forward(self, x):
    return self.lstm(x)[0]


def _lstm_setup():
  torch.manual_seed(5)
  lstm = torch.nn.LSTM(INPUT, HIDDEN, num_layers=1, batch_first=True)
  qmodel = _torch_dynamic(_Wrap(lstm), [torch.nn.LSTM])     # a copy: lstm stays float
  w_ih, w_hh = lstm.weight_ih_l0.detach().numpy(), lstm.weight_hh_l0.detach().numpy()
  b_ih, b_hh = lstm.bias_ih_l0.detach().numpy(), lstm.bias_hh_l0.detach().numpy()
  # torch's gate order is (i, f, g, o), its rows [g H, (g + 1) H); Flax has one Dense per
  # gate and input, with a single bias (on the hidden Dense): b_ih + b_hh.
  params = {}
  for g, name in enumerate("ifgo"):
    rows = slice(g * HIDDEN, (g + 1) * HIDDEN)
    params["i" + name] = {"kernel": w_ih[rows].T}
    params["h" + name] = {"kernel": w_hh[rows].T, "bias": b_ih[rows] + b_hh[rows]}
  # torch's weight observer sees the stacked (4H, K) matrices: one scale per matrix.
  spec = QuantSpec(bits=8, signed=True, symmetric=True)
  shared = {src: numerics.qparams_from_minmax(w.min(), w.max(), spec)
            for src, w in (("i", w_ih), ("h", w_hh))}
  torch_scales = {name: {**layer, "kernel": dynamic.quantize_kernel(
      layer["kernel"], qparams=shared[name[0]])} for name, layer in params.items()}
  return lstm, qmodel, params, torch_scales, (w_ih, w_hh, b_ih, b_hh), shared


def _torch_order_reference(x, weights, shared):
  """torch's dynamic LSTM from qjax pieces: W_ih x for all steps at once (one set of
  activation qparams for the whole sequence), W_hh h per step, each with its own bias."""
  w_ih, w_hh, b_ih, b_hh = weights
  k_ih = dynamic.quantize_kernel(w_ih.T, qparams=shared["i"])
  k_hh = dynamic.quantize_kernel(w_hh.T, qparams=shared["h"])
  return np.asarray(_torch_order_steps(x, k_ih, k_hh, b_ih, b_hh))


@jax.jit
def _torch_order_steps(x, k_ih, k_hh, b_ih, b_hh):
  """The recurrence of `_torch_order_reference`, compiled once (a scan over the steps)."""
  projected = dynamic.dynamic_dense(x, k_ih, b_ih)            # (B, T, 4H), whole sequence

  def step(carry, projected_t):
    h, c = carry
    gates = projected_t + dynamic.dynamic_dense(h, k_hh, b_hh)
    i, f, g, o = jnp.split(gates, 4, axis=1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h

  zeros = jnp.zeros((x.shape[0], HIDDEN), jnp.float32)
  _, outs = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(projected, 0, 1))
  return jnp.swapaxes(outs, 0, 1)


def test_lstm_matches_torch():
  float_lstm, qmodel, params, torch_scales, weights, shared = _lstm_setup()
  model = nn.RNN(nn.LSTMCell(HIDDEN))
  run = jax.jit(lambda v, x: dynamic.dynamic_apply(model, v, x))
  rng = np.random.default_rng(6)
  x = rng.normal(size=(BATCH, 6, INPUT)).astype(F32)
  expected = qmodel(torch.from_numpy(x)).detach().numpy()

  # The float models agree: the weight mapping is right.
  float_out = model.apply({"params": {"cell": params}}, x)
  torch_float = float_lstm(torch.from_numpy(x))[0].detach().numpy()
  assert np.abs(np.asarray(float_out) - torch_float).max() < 1e-6
  # nn.RNN quantizes each step's input on its own range, from a zero carry: its first step is
  # the one-step sequence x[:, :1]. One step: each quantized matmul sees the same activations
  # in both; what remains is the order of float additions (torch adds b_ih and b_hh
  # separately) and sigmoid / tanh.
  per_step = np.asarray(run({"params": {"cell": torch_scales}}, x))
  step_diff = np.abs(per_step[:, :1]
                     - qmodel(torch.from_numpy(x[:, :1])).detach().numpy()).max()
  assert step_diff < 1e-6, step_diff       # measured 4.5e-8

  # Torch's order, rebuilt from dynamic_dense, is torch's result to float rounding.
  rebuilt = _torch_order_reference(x, weights, shared)
  order_diff = np.abs(rebuilt - expected).max()
  assert order_diff < 1e-6, order_diff     # measured 7.5e-8

  # Over the whole sequence, per-step ranges leave a residual of a few 1e-3.
  seq_diff = np.abs(per_step - expected).max()
  assert 10 * order_diff < seq_diff < 0.03, seq_diff
  # With quantize_dynamic's own per-gate weight scales: the same order of magnitude.
  own = np.asarray(run({"params": {"cell": dynamic.quantize_dynamic(params)}}, x))
  own_diff = np.abs(own - expected).max()
  assert own_diff < 0.03, own_diff
  # Both stay within dynamic quantization's error of the float LSTM.
  assert np.abs(per_step - np.asarray(float_out)).max() < 0.05
