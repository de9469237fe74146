"""experiments/ptq_mnist.py end to end: a --quick run by default, the full run under -m slow."""

import json

import pytest

from support.experiments import load_experiment, user_promotion_rules  # noqa: F401  pylint: disable=unused-import

VARIANTS = ["float32", "float16", "bfloat16", "dynamic int8", "static fake-quant",
            "static int8 (float)", "static int8 (integer)", "static int8 (fbgemm)"]


def _rows(result):
  return {row["variant"]: row for row in result["rows"]}


def _check(results, *, min_agreement, max_drop_points):
  for name in ("mlp", "lenet5"):
    rows = _rows(results["models"][name])
    assert list(rows) == VARIANTS
    fp32 = rows["float32"]
    # Sizes: half precision halves every param; int8 kernels take a quarter plus qparams.
    assert rows["float16"]["bytes"] * 2 == fp32["bytes"] == rows["bfloat16"]["bytes"] * 2
    for variant in ("dynamic int8", "static int8 (float)", "static int8 (integer)",
                    "static int8 (fbgemm)"):
      assert 0.25 < rows[variant]["size_vs_float32"] < 0.3, (name, variant)
    for variant, row in rows.items():
      drop = 100 * (fp32["accuracy"] - row["accuracy"])
      assert drop <= max_drop_points, (name, variant, drop)
    for requant in ("float", "integer", "fbgemm"):
      assert rows[f"static int8 ({requant})"]["argmax_vs_fake_quant"] >= min_agreement
    assert "converted/fc1/op/kernel" in results["models"][name]["report_text"]


def test_ptq_mnist_quick(tmp_path, capsys):
  results = load_experiment("ptq_mnist").main(["--quick", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "static int8 (integer)" in out and "SQNR dB" in out
  assert json.loads((tmp_path / "results.json").read_text())["data"] == results["data"]
  assert results["data"]["train"] == 1000
  # Two epochs on 1,000 digits: an undertrained model, so bounds are loose; the full run
  # below holds the real ones.
  _check(results, min_agreement=0.98, max_drop_points=3)


@pytest.mark.slow
def test_ptq_mnist_full(tmp_path):
  results = load_experiment("ptq_mnist").main(["--out", str(tmp_path)])
  assert _rows(results["models"]["mlp"])["float32"]["accuracy"] > 0.92
  assert _rows(results["models"]["lenet5"])["float32"]["accuracy"] > 0.95
  _check(results, min_agreement=0.999, max_drop_points=1)
