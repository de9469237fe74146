"""experiments/sharded_qat.py --quick in this process, which has the 8 devices the script needs
(its full run, in a fresh process, is tests/test_sharded_qat_experiment.py's, under -m slow)."""

import json

from support.experiments import check_sharded_qat, load_experiment
from support.experiments import user_promotion_rules  # noqa: F401  pylint: disable=unused-import


def test_sharded_qat_quick(tmp_path, capsys):
  results = load_experiment("sharded_qat").main(["--quick", "--steps", "4", "--out",
                                                 str(tmp_path)])
  out = capsys.readouterr().out
  written = json.loads((tmp_path / "results.json").read_text())
  assert written == json.loads(json.dumps(results))
  check_sharded_qat(out, written)
  assert written["config"]["steps"] == 4
  # A few steps apart, the two runs differ by float rounding only. (Over hundreds of QAT
  # steps a rounding difference can move a weight across a grid step, and the runs drift
  # further apart: 6e-2 after the full run's 200 steps, at the same accuracy.)
  assert written["params_max_abs_difference"] < 1e-4
