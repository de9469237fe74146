"""Calibration as one call, compiled once: PyTorch's "run calibration batches after prepare".

`calibrate(model, variables, batches)` feeds every batch to `model.apply(..., mode="calibrate",
mutable=["quant_stats"])` under `jax.jit`. The compiled step is cached at module level, keyed
by the model (Flax modules are hashable dataclasses), the batch shapes and the keyword
arguments, so a second pipeline on the same model (another checkpoint, more batches, a
re-calibration after fine-tuning) reuses the executable instead of compiling a new lambda.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax

from qjax.nn.modules import STATS
from qjax.nn.qconfig import checked_lookups

__all__ = ["calibrate"]


@functools.partial(jax.jit, static_argnames=("model", "kwargs"))
def _step(model: nn.Module, variables: Any, args: tuple, kwargs: tuple) -> Any:
  _, updates = model.apply(variables, *args, mode="calibrate", mutable=[STATS], **dict(kwargs))
  return updates[STATS]


def calibrate(model: nn.Module, variables: Any, batches: Iterable[Any], **kwargs: Any) -> dict:
  """`variables` with their "quant_stats" updated by every batch, in order.

    stats_t = observe(stats_{t-1}, forward(params, batch_t))   for t = 1..T

  with each observer's own update (min/max, moving average, histogram), exactly what
  `model.apply(v, x, mode="calibrate", mutable=["quant_stats"])` does per batch. The step is
  jitted once per model, batch shape and keyword arguments, and reused by later calls.

  Args:
    model: a Flax module built from qjax.nn's layers; its call takes `mode=`.
    variables: {"params", "quant_stats", ...} from `model.init` (other collections, e.g.
      "batch_stats", are passed through unchanged).
    batches: an iterable of inputs; an element that is a tuple is passed as several
      positional arguments.
    **kwargs: further keyword arguments of the model's call (e.g. `train=False`); they must be
      hashable (they are static under jit).

  Returns:
    A new variables dict: `variables` with "quant_stats" replaced.

  Raises:
    ValueError: no "quant_stats" in `variables`, an empty `batches`, or a `QConfigMap`
      pattern that decides none of the model's layers (`qjax.nn.check_qconfig_map`).
    TypeError: unhashable keyword arguments.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import qjax.nn as qnn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, *, mode):
    ...     x = qnn.Quantize(qnn.default_qconfig)(x, mode=mode)
    ...     x = qnn.QuantDense(4, qconfig=qnn.default_qconfig, name="fc")(x, mode=mode)
    ...     return qnn.Dequantize()(x, mode=mode)
    >>> model, x = Net(), jnp.linspace(-1.0, 1.0, 24).reshape(3, 8)
    >>> variables = model.init(jax.random.key(0), x, mode="float")
    >>> variables = qnn.calibrate(model, variables, [x, 2 * x])
    >>> float(variables["quant_stats"]["Quantize_0"]["max_val"])
    2.0
  """
  if not hasattr(variables, "keys") or STATS not in variables:
    raise ValueError(f"calibrate: variables must hold the '{STATS}' collection of "
                     f"model.init(...) (the observers' states); got "
                     f"{sorted(variables) if hasattr(variables, 'keys') else type(variables)}.")
  items = tuple(sorted(kwargs.items()))
  try:
    hash(items)
  except TypeError as err:
    raise TypeError(f"calibrate: keyword arguments of the model call must be hashable (they "
                    f"are static under jit); got {kwargs!r}.") from err
  stats, seen = variables[STATS], 0
  with checked_lookups():  # a QConfigMap pattern that decides no layer raises (first trace)
    for batch in batches:
      args = batch if isinstance(batch, tuple) else (batch,)
      stats = _step(model, {**variables, STATS: stats}, args, items)
      seen += 1
  if not seen:
    raise ValueError("calibrate: batches is empty; pass at least one calibration batch.")
  return {**variables, STATS: stats}
