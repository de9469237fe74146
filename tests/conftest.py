"""Test-wide settings.

Strict dtype promotion and raising rank promotion (equinox's habit) turn silent widening,
int8 -> int32 or float32 -> bfloat16, and accidental broadcasting into errors.

Hypothesis draws the same examples on every run and machine ("ci" profile, derandomized), so a
run's outcome never depends on luck; `--hypothesis-profile=explore` draws fresh examples to
search for new counterexamples.
"""

import hypothesis
import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# "ci": the same examples on every run, 50 per property unless a test asks for more or fewer
# (the suite's time budget); "explore": fresh examples, hypothesis's default 100 and more.
hypothesis.settings.register_profile("ci", derandomize=True, database=None, max_examples=50)
hypothesis.settings.register_profile("explore", derandomize=False)
hypothesis.settings.load_profile("ci")
