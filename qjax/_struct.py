"""Typed pytrees: frozen dataclasses whose array fields are leaves and the rest static.

The integer path's lowered variables are such structs (a converted Dense, a requantizer, a
residual add): the type says what an object is and how it runs, `jax.jit` traces its arrays
and keys its compilation on the static fields, and `qjax.io` stores it by its registered name
(static fields must then be None, bools, ints, floats, strings, QuantSpecs or tuples of
those).

    @struct
    class Scaled:
      value: jax.Array
      bits: int = static(default=8)
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from typing_extensions import dataclass_transform

import jax

T = TypeVar("T")

_REGISTRY: dict[str, type] = {}


def static(**kwargs: Any) -> Any:
  """A dataclass field that is part of the pytree's structure, not a leaf."""
  return dataclasses.field(metadata={"static": True}, **kwargs)


@dataclass_transform(frozen_default=True, kw_only_default=True,
                     field_specifiers=(dataclasses.field, static))
def struct(cls: type[T]) -> type[T]:
  """Make `cls` a frozen, keyword-only dataclass registered as a pytree (fields made with
  `static()` are metadata, the others children) and by name for `qjax.io`."""
  cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
  fields = dataclasses.fields(cls)  # type: ignore[arg-type]
  data = [f.name for f in fields if not f.metadata.get("static")]
  meta = [f.name for f in fields if f.metadata.get("static")]
  jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
  return register(cls)


def register(cls: type[T]) -> type[T]:
  """Register a frozen dataclass that is already a pytree (its own flattening, fields made
  with `static()` for its static ones) by name, so that `qjax.io` stores it as a struct."""
  name = cls.__name__
  if name in _REGISTRY and _REGISTRY[name].__module__ != cls.__module__:
    raise TypeError(f"struct: two struct types are named {name!r} "
                    f"({_REGISTRY[name].__module__} and {cls.__module__}).")
  _REGISTRY[name] = cls
  return cls


def is_struct(value: Any) -> bool:
  """Whether `value` is an instance of a `struct` type."""
  return _REGISTRY.get(type(value).__name__) is type(value)


def struct_type(name: str) -> type | None:
  """The registered struct type called `name` (None if there is none)."""
  return _REGISTRY.get(name)


def split_fields(value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """(children, static fields) of a struct instance, by field name."""
  children: dict[str, Any] = {}
  statics: dict[str, Any] = {}
  for f in dataclasses.fields(value):
    (statics if f.metadata.get("static") else children)[f.name] = getattr(value, f.name)
  return children, statics
