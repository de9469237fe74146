"""Quantizers beyond the observer-based grids: half-precision casts (`casts`).

Each quantizer is a pure function; those with a gradient of their own define it with
`jax.custom_vjp`.
"""

from qjax.quantizers.binary import binary_weight
from qjax.quantizers.binary import ternary_weight
from qjax.quantizers.casts import CAST_DTYPES
from qjax.quantizers.casts import cast_floats
from qjax.quantizers.casts import half
from qjax.quantizers.dorefa import dorefa_activation
from qjax.quantizers.dorefa import dorefa_weight
from qjax.quantizers.dorefa import quantize_k
from qjax.quantizers.pact import pact
from qjax.quantizers.pact import pact_l2
from qjax.quantizers.wrpn import wrpn_activation
from qjax.quantizers.wrpn import wrpn_weight

__all__ = (
    "CAST_DTYPES",
    "binary_weight",
    "cast_floats",
    "dorefa_activation",
    "dorefa_weight",
    "half",
    "pact",
    "pact_l2",
    "quantize_k",
    "ternary_weight",
    "wrpn_activation",
    "wrpn_weight",
)
