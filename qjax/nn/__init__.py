"""Flax linen layer of qjax: observers in the "quant_stats" collection, calibration and QAT."""

from qjax.nn.calibration import calibrate
from qjax.nn.functional import AvgPool
from qjax.nn.functional import QuantAdd
from qjax.nn.functional import QuantConcat
from qjax.nn.functional import QuantReLU
from qjax.nn.functional import max_pool
from qjax.nn.fused import QuantConvBN
from qjax.nn.fused import QuantDenseBN
from qjax.nn.modules import Dequantize
from qjax.nn.modules import FakeQuant
from qjax.nn.modules import CONVERTED
from qjax.nn.modules import LearnableFakeQuant
from qjax.nn.modules import Mode
from qjax.nn.modules import QPARAMS
from qjax.nn.modules import QuantConv
from qjax.nn.modules import QuantConvGeneral
from qjax.nn.modules import QuantDense
from qjax.nn.modules import QuantDotGeneral
from qjax.nn.modules import QuantizerPoint
from qjax.nn.modules import Quantize
from qjax.nn.modules import STATS
from qjax.nn.modules import as_mode
from qjax.nn.modules import check_calibrated
from qjax.nn.modules import collect_qparams
from qjax.nn.modules import module_path
from qjax.nn.packing import PackedVariables
from qjax.nn.qconfig import QConfig
from qjax.nn.qconfig import QConfigMap
from qjax.nn.qconfig import bits_qconfig
from qjax.nn.qconfig import check_qconfig_map
from qjax.nn.qconfig import default_qconfig
from qjax.nn.qconfig import get_default_qat_qconfig
from qjax.nn.qconfig import get_default_qconfig
from qjax.nn.recurrent import scan
from qjax.nn.snn import LIF
from qjax.nn.snn import LIFCell
from qjax.nn.snn import LIFStateQConfig
from qjax.nn.snn import SPIKE_OBSERVER
from qjax.nn.snn import observed_state
from qjax.nn.snn import threshold_state

__all__ = (
    "LIF",
    "LIFCell",
    "LIFStateQConfig",
    "SPIKE_OBSERVER",
    "observed_state",
    "threshold_state",
    "AvgPool",
    "CONVERTED",
    "Dequantize",
    "FakeQuant",
    "LearnableFakeQuant",
    "Mode",
    "PackedVariables",
    "QConfig",
    "QConfigMap",
    "QPARAMS",
    "QuantConv",
    "QuantAdd",
    "QuantConcat",
    "QuantConvBN",
    "QuantConvGeneral",
    "QuantDense",
    "QuantDenseBN",
    "QuantDotGeneral",
    "QuantReLU",
    "Quantize",
    "QuantizerPoint",
    "STATS",
    "as_mode",
    "bits_qconfig",
    "calibrate",
    "check_calibrated",
    "check_qconfig_map",
    "collect_qparams",
    "default_qconfig",
    "get_default_qat_qconfig",
    "get_default_qconfig",
    "max_pool",
    "module_path",
    "scan",
)
