"""The integer inference path.

`arith` holds the int8 x int8 -> int32 math and the requantization formulas; `requant` the
requantizer types; `forms` one integer form per operation kind (mark -> lower -> run) and the
typed ops they lower to; `convert` turns a calibrated model into those ops; `dynamic` runs
stock Dense layers with int8 weights and per-batch activation qparams on the same matmul;
`sharding` places those variables on a device mesh (kernels split over output channels).
"""

from qjax.integer import arith
from qjax.integer import dynamic
from qjax.integer import forms
from qjax.integer import requant
from qjax.integer import sharding
from qjax.integer.conversion import convert
from qjax.integer.conversion import for_serving
from qjax.integer.conversion import trace_dataflow
from qjax.integer.forms import COLLECTION
from qjax.integer.requant import FbgemmRequant
from qjax.integer.requant import FloatRequant
from qjax.integer.requant import IntegerRequant
from qjax.integer.requant import Requant
from qjax.integer.requant import as_requant
from qjax.integer.sharding import integer_variable_shardings
from qjax.integer.sharding import shard_integer_variables

__all__ = (
    "COLLECTION",
    "FbgemmRequant",
    "FloatRequant",
    "IntegerRequant",
    "Requant",
    "arith",
    "as_requant",
    "convert",
    "dynamic",
    "for_serving",
    "forms",
    "integer_variable_shardings",
    "requant",
    "shard_integer_variables",
    "sharding",
    "trace_dataflow",
)
