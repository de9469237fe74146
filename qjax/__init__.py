"""qjax: functional quantization for JAX and Flax.

Pure quantizers and straight-through gradients (this namespace), observers as pure
(init, update, qparams) functions (`qjax.observers`), and Flax modules for calibration and
QAT that keep observer state in the "quant_stats" collection (`import qjax.nn`).
"""

from qjax import observers

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
    "dequantize",
    "fake_quant",
    "fake_quant_learnable",
    "lsq_grad_factor",
    "observers",
    "minmax",
    "qparams_from_minmax",
    "quantize",
    "quantize_array",
    "quantize_dequantize",
    "round_ste",
)
