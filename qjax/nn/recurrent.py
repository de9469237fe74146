"""Quantized modules inside `flax.linen.scan` (a loop over time steps).

Observer statistics are state that every step updates, so while they are being updated
(calibration, QAT with mutable "quant_stats") they must be carried from step to step; at
init (observers do not update) and when they are frozen they are loop invariants and must be
broadcast instead: Flax refuses a broadcast collection that the body writes, and a carry whose
structure changes (created at init, or dropped when immutable). `scan` picks the right one on
each call, and broadcasts the converted ops of mode "int8".

A scanned cell receives no keyword arguments from `nn.scan`: give it its mode as a field.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from qjax.nn import _integer
from qjax.nn.modules import QPARAMS, STATS


def scan(target: type[nn.Module], parent: nn.Module, **scan_kwargs: Any) -> Any:
  """`nn.scan(target, **scan_kwargs)` with qjax's collections handled (module docstring).

  Call it inside the parent's `@nn.compact` method: whether the statistics are carried or
  broadcast depends on the parent's current call. "params" are broadcast (one set of weights
  for every step) unless `variable_broadcast` says otherwise; other `nn.scan` arguments
  (`in_axes`, `out_axes`, `split_rngs`, `length`, `reverse`, ...) pass through.

  Example:
    >>> import jax, jax.numpy as jnp, qjax.nn as qnn
    >>> class Cell(nn.Module):
    ...   mode: str = "float"
    ...   @nn.compact
    ...   def __call__(self, h, x):
    ...     q = qnn.Quantize(qconfig=qnn.default_qconfig, mode=self.mode)(x + h)
    ...     y = qnn.QuantDense(2, qconfig=qnn.default_qconfig, mode=self.mode)(q)
    ...     h = qnn.Dequantize(mode=self.mode)(y)
    ...     return h, h
    >>> class RNN(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, xs, mode="float"):           # xs: (time, batch, 2)
    ...     step = qnn.scan(Cell, self, split_rngs={"params": False})(mode=mode)
    ...     return step(jnp.zeros(xs.shape[1:]), xs)[1]
    >>> xs = jnp.ones((5, 3, 2))
    >>> v = RNN().init(jax.random.key(0), xs)
    >>> v = qnn.calibrate(RNN(), v, [xs])
    >>> int(v["quant_stats"]["ScanCell_0"]["Quantize_0"]["count"])   # one update per step
    5
  """
  broadcast = scan_kwargs.pop("variable_broadcast", "params")
  broadcast = [broadcast] if isinstance(broadcast, str) else list(broadcast or [])
  carry = scan_kwargs.pop("variable_carry", [])
  carry = [carry] if isinstance(carry, str) else list(carry or [])
  if parent.is_mutable_collection(STATS) and not parent.is_initializing():
    carry.append(STATS)
  else:
    broadcast += [STATS, QPARAMS]
  broadcast.append(_integer.COLLECTION)
  return nn.scan(target, variable_broadcast=broadcast, variable_carry=carry, **scan_kwargs)
