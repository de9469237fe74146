"""Quantizers beyond the observer-based grids: half-precision casts (`casts`), DoReFa-Net
(`dorefa`), PACT (`pact`), WRPN (`wrpn`), binary and ternary weights (`binary`).

Each quantizer is a pure function; those with a gradient of their own define it with
`jax.custom_vjp`. `points` wraps them as quantization points that `qjax.nn.QConfig` takes in
place of an observer (`DoReFaWeight`, `PACT`, ...), with the integer grids `qjax.convert`
lowers them to.
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
from qjax.quantizers.points import PACT
from qjax.quantizers.points import ActivationQuantizer
from qjax.quantizers.points import BinaryWeight
from qjax.quantizers.points import DoReFaActivation
from qjax.quantizers.points import DoReFaWeight
from qjax.quantizers.points import Quantizer
from qjax.quantizers.points import TernaryWeight
from qjax.quantizers.points import WeightQuantizer
from qjax.quantizers.points import WRPNActivation
from qjax.quantizers.points import WRPNWeight
from qjax.quantizers.points import pact_penalty
from qjax.quantizers.wrpn import wrpn_activation
from qjax.quantizers.wrpn import wrpn_weight

__all__ = (
    "ActivationQuantizer",
    "BinaryWeight",
    "CAST_DTYPES",
    "DoReFaActivation",
    "DoReFaWeight",
    "PACT",
    "Quantizer",
    "TernaryWeight",
    "WRPNActivation",
    "WRPNWeight",
    "WeightQuantizer",
    "pact_penalty",
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
