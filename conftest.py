"""Doctests whose example runs on the native kernel library (guarded by `if native_paths():`,
so it prints nothing without the library) are skipped where the library is not built; their
output would otherwise be missing, not wrong."""

from __future__ import annotations

import pytest
from _pytest.doctest import DoctestItem

_GUARDS = ("if native_paths():", "if kernels.native_paths():")


def _needs_library(item: pytest.Item) -> bool:
  return isinstance(item, DoctestItem) and item.dtest is not None and any(
      example.source.lstrip().startswith(_GUARDS) for example in item.dtest.examples)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
  del config
  guarded = [item for item in items if _needs_library(item)]
  if not guarded:
    return
  from qjax.integer import kernels  # pylint: disable=import-outside-toplevel
  if not kernels.available():
    for item in guarded:
      item.add_marker(pytest.mark.skip(reason="the native kernel library is not built"))
