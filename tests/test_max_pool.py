"""qnn.max_pool: nn.max_pool's values on float and int8 inputs, eagerly and under jit."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.nn import max_pool

CASES = [  # (shape, window, strides, padding): the fast slices form and the fallback
    ((2, 28, 28, 6), (2, 2), (2, 2), "VALID"),  # LeNet-5's pools
    ((2, 9, 7, 3), (2, 3), (2, 3), "VALID"),  # edges that do not fill a window are dropped
    ((3, 10, 4), (3,), (3,), "VALID"),  # one spatial axis
    ((1, 4, 4, 5, 2), (2, 2, 2), (2, 2, 2), "VALID"),  # three
    ((2, 8, 8, 2), (3, 3), (1, 1), "VALID"),  # overlapping windows: nn.max_pool itself
    ((2, 8, 8, 2), (2, 2), (2, 2), "SAME"),
    ((2, 8, 8, 2), (2, 2), None, "VALID"),  # strides default to 1, as in nn.max_pool
]


@pytest.mark.parametrize("shape,window,strides,padding", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.int8])
def test_equals_flax_max_pool(shape, window, strides, padding, dtype):
  rng = np.random.default_rng(len(shape) + sum(window))
  x = jnp.asarray(rng.normal(0, 50, shape).astype(dtype))
  want = nn.max_pool(x, window, strides=strides, padding=padding)
  pool = lambda v: max_pool(v, window, strides, padding)  # noqa: E731
  for got in (pool(x), jax.jit(pool)(x)):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_nan_propagates_to_its_window_only():
  x = jnp.zeros((1, 4, 4, 1), jnp.float32).at[0, 1, 1, 0].set(jnp.nan)
  got = np.asarray(max_pool(x, (2, 2), (2, 2)))[0, :, :, 0]
  np.testing.assert_array_equal(np.isnan(got), [[True, False], [False, False]])
