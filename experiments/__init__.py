"""qjax's experiments: the MNIST study (`python -m experiments.mnist`), focused studies and
benchmarks, over qjax's public API. Run them from the repository root with `python -m`."""
