"""Integer forms: one class per operation kind, owning its mark -> lower -> run
(`qjax.integer.forms.base` explains the protocol)."""

from qjax.integer.forms.base import COLLECTION
from qjax.integer.forms.base import OP
from qjax.integer.forms.base import ActivationGrid
from qjax.integer.forms.base import Form
from qjax.integer.forms.base import Grid
from qjax.integer.forms.base import Lowering
from qjax.integer.forms.base import WeightRequest
from qjax.integer.forms.boundary import DequantizeForm
from qjax.integer.forms.boundary import DequantizeOp
from qjax.integer.forms.boundary import QuantizeForm
from qjax.integer.forms.boundary import QuantizeOp
from qjax.integer.forms.linear import Int8Conv
from qjax.integer.forms.linear import Int8Dense
from qjax.integer.forms.linear import LinearForm

__all__ = (
    "COLLECTION",
    "OP",
    "ActivationGrid",
    "DequantizeForm",
    "DequantizeOp",
    "Form",
    "Grid",
    "Int8Conv",
    "Int8Dense",
    "LinearForm",
    "Lowering",
    "QuantizeForm",
    "QuantizeOp",
    "WeightRequest",
)
