"""Test-wide JAX settings.

Strict dtype promotion and raising rank promotion (equinox's habit) turn silent widening,
int8 -> int32 or float32 -> bfloat16, and accidental broadcasting into errors.
"""

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
