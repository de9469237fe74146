"""Marks on a model's dataflow, for `qjax.convert` to find which quantization point feeds which
layer.

While `tracing()` is active (only inside `qjax.convert`, around a `jax.make_jaxpr` of the
float forward), qjax's boundary modules and layers pass their inputs and outputs through
`mark`, an identity primitive whose parameters name the module. Reading the jaxpr, convert
follows every quantized tensor from the point that produced it to the layers that consume
it, through grid-preserving ops only (reshape, max pooling, ...): that gives each layer its
input qparams, and catches the cases the integer path cannot run (a float op on an int8
tensor, a model output that was never dequantized). Outside `tracing()` nothing is marked.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax
from jax.extend import core as jex_core
from jax.interpreters import mlir

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("qjax_trace_points",
                                                               default=False)

mark_p = jex_core.Primitive("qjax_mark")
mark_p.def_impl(lambda x, **_: x)
mark_p.def_abstract_eval(lambda x, **_: x)
mlir.register_lowering(mark_p, mlir.lower_fun(lambda x, **_: x, multiple_results=False))


def active() -> bool:
  return _ACTIVE.get()


@contextlib.contextmanager
def tracing() -> Iterator[None]:
  """Turn marking on for the duration (used by `qjax.convert`)."""
  token = _ACTIVE.set(True)
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def mark(x: jax.Array, *, role: str, path: str, **info: Any) -> jax.Array:
  """x itself; while tracing, marked as the `role` ("out": a quantized tensor produced by the
  module at `path`; "same": produced by it on its input's grid; "in": consumed by it as
  int8; "float_in": consumed by it as float)."""
  if not active():
    return x
  return mark_p.bind(x, role=role, path=path, info=tuple(sorted(info.items())))
