"""qjax: functional quantization for JAX and Flax.

Pure quantizers, straight-through gradients, and (as they land) observers in Flax
collections, QAT, and a jit-compiled int8 inference path.
"""

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
    "minmax",
    "qparams_from_minmax",
    "quantize",
    "quantize_array",
    "quantize_dequantize",
    "round_ste",
)
