"""Integer forms: one class per operation kind, owning its mark -> lower -> run
(`qjax.integer.forms.base` explains the protocol)."""

from qjax.integer.forms.add import AddForm
from qjax.integer.forms.add import Int8Add
from qjax.integer.forms.add import IntegerAdd
from qjax.integer.forms.base import COLLECTION
from qjax.integer.forms.base import OP
from qjax.integer.forms.base import ActivationGrid
from qjax.integer.forms.base import Form
from qjax.integer.forms.base import Grid
from qjax.integer.forms.base import Lowering
from qjax.integer.forms.base import WeightRequest
from qjax.integer.forms.boundary import DequantizeForm
from qjax.integer.forms.concat import ConcatForm
from qjax.integer.forms.concat import Int8Concat
from qjax.integer.forms.concat import IntegerConcat
from qjax.integer.forms.dot import DotForm
from qjax.integer.forms.dot import QuantizedConv
from qjax.integer.forms.dot import QuantizedDot
from qjax.integer.forms.boundary import DequantizeOp
from qjax.integer.forms.boundary import QuantizeForm
from qjax.integer.forms.boundary import QuantizeOp
from qjax.integer.forms.linear import Int8Conv
from qjax.integer.forms.linear import Int8Dense
from qjax.integer.forms.linear import LinearForm
from qjax.integer.forms.pool import Int8AvgPool
from qjax.integer.forms.pool import PoolForm
from qjax.integer.forms.relu import Int8ReLU
from qjax.integer.forms.relu import ReLUForm

__all__ = (
    "COLLECTION",
    "OP",
    "ActivationGrid",
    "AddForm",
    "ConcatForm",
    "DequantizeForm",
    "DequantizeOp",
    "DotForm",
    "Form",
    "Grid",
    "Int8Add",
    "Int8AvgPool",
    "Int8Concat",
    "Int8Conv",
    "Int8Dense",
    "Int8ReLU",
    "IntegerAdd",
    "IntegerConcat",
    "LinearForm",
    "Lowering",
    "PoolForm",
    "QuantizeForm",
    "QuantizeOp",
    "QuantizedConv",
    "QuantizedDot",
    "ReLUForm",
    "WeightRequest",
)
