"""qjax: functional quantization for JAX and Flax.

Pure quantizers and straight-through gradients (this namespace), observers as pure
(init, update, qparams) functions (`qjax.observers`), Flax modules for calibration and QAT
that keep observer state in the "quant_stats" collection (`import qjax.nn`), and the integer
inference path in `qjax.integer`: `qjax.convert` (calibrated float variables -> the typed
integer ops of mode "int8"), their int8 x int8 -> int32 math (`qjax.integer.arith`), one
integer form per operation kind (`qjax.integer.forms`), `qjax.dynamic` (dynamic quantization of
any Flax model's Dense layers on the same int8 matmul); `qjax.io` (save / load without
pickle), `qjax.report`
(model size, per-layer report), `qjax.fuse` (BatchNorm folding), `qjax.quantizers`
(half-precision casts) and `qjax.sharding` (NamedShardings of a model's variables and
batches on a device mesh; `qjax.integer_variable_shardings` for converted int8 variables).
"""

from qjax import fuse
from qjax import integer
from qjax import interop
from qjax import io
from qjax import observers
from qjax import quantizers
from qjax import report
from qjax import sharding
from qjax import snn

from qjax.fuse import fold_batch_norm
from qjax.fuse import fold_batch_norms
from qjax.fuse import folded_kernel_and_bias
from qjax.integer import dynamic
from qjax.integer import for_serving
from qjax.integer import integer_variable_shardings
from qjax.integer.conversion import convert
from qjax.numerics import FLOAT32_EPS
from qjax.numerics import QParams
from qjax.numerics import QuantSpec
from qjax.numerics import dequantize
from qjax.numerics import minmax
from qjax.numerics import qparams_from_minmax
from qjax.numerics import quantize
from qjax.numerics import quantize_dequantize
from qjax.qarray import QArray
from qjax.qarray import quantize_array
from qjax.quantizers import cast_floats
from qjax.quantizers import half
from qjax.report import model_size
from qjax.ste import fake_quant
from qjax.ste import fake_quant_learnable
from qjax.ste import lsq_grad_factor
from qjax.ste import round_ste

__version__ = "0.1.0"

__all__ = (
    "FLOAT32_EPS",
    "QArray",
    "QParams",
    "QuantSpec",
    "cast_floats",
    "convert",
    "dequantize",
    "dynamic",
    "fake_quant",
    "fake_quant_learnable",
    "fold_batch_norm",
    "fold_batch_norms",
    "folded_kernel_and_bias",
    "for_serving",
    "fuse",
    "half",
    "integer",
    "integer_variable_shardings",
    "interop",
    "io",
    "lsq_grad_factor",
    "minmax",
    "model_size",
    "observers",
    "qparams_from_minmax",
    "quantize",
    "quantize_array",
    "quantize_dequantize",
    "quantizers",
    "report",
    "round_ste",
    "sharding",
    "snn",
)
