"""Test-wide settings.

Strict dtype promotion and raising rank promotion (equinox's habit) turn silent widening,
int8 -> int32 or float32 -> bfloat16, and accidental broadcasting into errors.

Hypothesis draws the same examples on every run and machine ("ci" profile, derandomized), so a
run's outcome never depends on luck; `--hypothesis-profile=explore` draws fresh examples to
search for new counterexamples.

PyTorch, where a test module has imported it, runs each module on one intra-op thread: the
suite runs one worker process per core (pyproject.toml's `-n 2`), and a second torch thread
only contends with the other worker (small ops then spend milliseconds waking and
spin-waiting on the pool, burning CPU time and slowing both workers).
"""

import os
import sys

import hypothesis
import jax
import pytest

# tests/sharded needs 8 simulated devices: tests/test_sharding.py runs it in a child process.
if os.environ.get("QJAX_SHARDED_TESTS") != "1":
  collect_ignore = ["sharded"]

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# "ci": the same examples on every run, 50 per property unless a test asks for more or fewer
# (the suite's time budget); "explore": fresh examples, hypothesis's default 100 and more.
hypothesis.settings.register_profile("ci", derandomize=True, database=None, max_examples=50)
hypothesis.settings.register_profile("explore", derandomize=False)
hypothesis.settings.load_profile("ci")


@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
  """torch.set_num_threads(1) for the module, restored after it (see the module docstring);
  nothing when torch is not imported."""
  torch = sys.modules.get("torch")
  if torch is None:
    yield
    return
  saved = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(saved)


# The longest files first: under xdist's --dist loadfile a file handed out last keeps one
# worker busy while the other idles (tests/test_sharding.py's child pytest takes about a
# minute). Every worker sorts the same way, as xdist requires.
_FIRST = ("tests/test_sharding.py", "tests/test_int8_forward.py", "tests/test_dynamic.py",
          "tests/test_native_kernel.py", "tests/test_mnist.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    path = item.nodeid.split("::")[0]
    return _FIRST.index(path) if path in _FIRST else len(_FIRST)
  items.sort(key=rank)  # stable: the rest keeps its order
