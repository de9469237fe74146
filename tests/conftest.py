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

Compilations are shared through JAX's persistent compilation cache in a directory made for
the run (both worker processes read and write it; removed at the end): tests that jit the
same program (a fresh `jax.jit` per test, the same model in two test files) compile it once.
A cached executable is the one the other process compiled on this machine, so results do not
change; QJAX_TEST_COMPILATION_CACHE names a directory to keep instead.
"""

import os
import shutil
import sys
import tempfile

import hypothesis
import jax
import pytest

# tests/sharded needs 8 simulated devices: tests/test_sharding.py runs it in a child process.
if os.environ.get("QJAX_SHARDED_TESTS") != "1":
  collect_ignore = ["sharded"]

_CACHE_VAR = "QJAX_TEST_COMPILATION_CACHE"
_RUN_CACHE_VAR = "QJAX_TEST_RUN_COMPILATION_CACHE"
_made_here: list[str] = []


def pytest_configure(config):
  """The run's compilation cache: made by the controlling process, inherited by the workers
  (they start after this hook, with its environment)."""
  del config
  directory = os.environ.get(_CACHE_VAR) or os.environ.get(_RUN_CACHE_VAR)
  if directory is None:
    directory = tempfile.mkdtemp(prefix="qjax-test-jax-cache-")
    os.environ[_RUN_CACHE_VAR] = directory
    _made_here.append(directory)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  """Removes the run's cache in the process that made it (not in workers or child runs)."""
  del config
  for directory in _made_here:
    shutil.rmtree(directory, ignore_errors=True)
    os.environ.pop(_RUN_CACHE_VAR, None)
  _made_here.clear()


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
