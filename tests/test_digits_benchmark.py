"""benchmarks/digits_morpho.py end to end on one short epoch: the JSON the issue specifies."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("digits_morpho_benchmark", REPO / "benchmarks" / "digits_morpho.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_epoch_writes_the_specified_json_with_the_part_size(tmp_path, capsys):
    out = tmp_path / "out.json"
    _script().main(["--method", "mimmx", "--seeds", "1", "--epochs", "1", "--part-size", "2", "--threads", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert (result["method"], result["correlation"], result["seeds"], result["part_size"]) == ("mimmx", 0.9, 1, 2)
    for test in ("iid", "balanced", "inverted"):
        assert set(result["tests"][test]) == {"y_acc", "y_bacc", "worst_group_acc"}
        assert 0.0 <= result["tests"][test]["y_acc"] <= 1.0
    assert set(result["leakage"]) == set(result["switched"]) == {"thickness", "rotation"}
    assert len(result["per_seed"]) == 1 and result["seconds"] > 0
    assert "| mimmx |" in capsys.readouterr().out
