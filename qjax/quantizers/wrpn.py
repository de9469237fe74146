"""WRPN quantizers (Mishra et al. 2017, arXiv:1709.01134): weights on a signed k-bit grid in
[-1, 1] (k - 1 bits of magnitude plus a sign), activations on a k-bit grid in [0, 1], both with
a straight-through gradient inside the clip.

Values are computed in float32 and returned in the input's dtype.
"""

from __future__ import annotations

import jax

from qjax.quantizers import _common


def wrpn_weight(w: jax.typing.ArrayLike, bits: int) -> jax.Array:
  """WRPN weights: sign plus k - 1 bits of magnitude in [-1, 1].

    w_q     = rne(clip(w, -1, 1) (2^(k-1) - 1)) / (2^(k-1) - 1)
    dw_q/dw = 1 if -1 <= w <= 1 else 0

  Args:
    w: floating-point weights; the result keeps their dtype.
    bits: k, a Python int in 2..16.

  Returns:
    w_q on the grid {-1, ..., -1/(2^(k-1) - 1), 0, 1/(2^(k-1) - 1), ..., 1}.

  Example:
    >>> import jax.numpy as jnp
    >>> wrpn_weight(jnp.array([-3.0, -0.4, 0.2, 0.9]), 3)
    Array([-1.        , -0.33333334,  0.33333334,  1.        ], dtype=float32)
  """
  bits = _common.check_bits("wrpn_weight", bits, 2, 16)
  w = _common.float_input("wrpn_weight", w, "w")
  return _common.clip_round(-1.0, float(2**(bits - 1) - 1), w)


def wrpn_activation(x: jax.typing.ArrayLike, bits: int) -> jax.Array:
  """WRPN activations: k bits in [0, 1].

    y     = rne(clip(x, 0, 1) (2^k - 1)) / (2^k - 1)
    dy/dx = 1 if 0 <= x <= 1 else 0

  Args:
    x: floating-point activations; the result keeps their dtype.
    bits: k, a Python int in 1..16.

  Returns:
    y on the grid {0, 1/(2^k - 1), ..., 1}, same shape and dtype.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> wrpn_activation(jnp.array([-1.0, 0.2, 0.5, 4.0]), 2)
    Array([0.        , 0.33333334, 0.6666667 , 1.        ], dtype=float32)
    >>> jax.grad(lambda v: wrpn_activation(v, 2).sum())(jnp.array([-1.0, 0.2, 4.0]))
    Array([0., 1., 0.], dtype=float32)
  """
  bits = _common.check_bits("wrpn_activation", bits, 1, 16)
  x = _common.float_input("wrpn_activation", x)
  return _common.clip_round(0.0, float(2**bits - 1), x)
