"""Quantizers beyond the observer-based grids: half-precision casts (`casts`).

Each quantizer is a pure function; those with a gradient of their own define it with
`jax.custom_vjp`.
"""

from qjax.quantizers.casts import CAST_DTYPES
from qjax.quantizers.casts import cast_floats
from qjax.quantizers.casts import half

__all__ = (
    "CAST_DTYPES",
    "cast_floats",
    "half",
)
