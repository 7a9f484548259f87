"""benchmarks/digits_morpho.py end to end on one short epoch: the JSON the issue specifies."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

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


def _strict_json(text: str):
    """Parse JSON as jq and JavaScript do: a bare NaN or Infinity is an error."""

    def refuse(constant: str):
        raise ValueError(f"bare {constant} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_oracle_trains_on_balanced_data_and_writes_strict_json(tmp_path):
    out = tmp_path / "oracle.json"
    _script().main(["--method", "oracle", "--seeds", "1", "--epochs", "1", "--part-size", "2", "--threads", "1", "--json", str(out)])
    result = _strict_json(out.read_text())
    assert result["method"] == "oracle" and set(result["tests"]) == {"iid", "balanced", "inverted"}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--seeds", "0"], "--seeds: must be at least 1"),
        (["--correlation", "1.5"], "strictly between 0.5 and 1, got 1.5"),
        (["--correlation", "1"], "strictly between 0.5 and 1, got 1.0"),
        (["--correlation", "0.5"], "strictly between 0.5 and 1, got 0.5"),
        (["--correlation", "0.3"], "strictly between 0.5 and 1, got 0.3"),
        (["--correlation", "nan"], "strictly between 0.5 and 1, got nan"),
        (["--confounders", "thickness,colour"], "--confounders takes distinct names from thickness,rotation"),
        (["--method", "erm,oracel"], "unknown methods ['oracel']"),
        (["--epochs", "0"], "--epochs: must be at least 1"),
    ],
)
def test_bad_arguments_are_refused_before_any_training(arguments, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        _script().parse_args(arguments)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_a_json_path_that_is_a_folder_is_refused_before_any_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _script().parse_args(["--json", str(tmp_path)])
    assert f"{str(tmp_path)!r} is a folder; name a file in it" in capsys.readouterr().err
