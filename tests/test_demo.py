"""``mimm-med demo``, the README's main job, end to end on a tiny stand-in cohort."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mimm_med.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repository_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folders the demo reads from its working folder, copied, so that its models and reports stay in ``tmp_path``."""
    for folder in ("bundles", "cohorts", "preprocessing"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("models", "eval", "predictions"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def test_the_demo_trains_evaluates_registers_and_prints_its_table(repository_copy: Path, capsys):
    argv = ["demo", "--workdir", str(repository_copy / "brain"), "--subjects", "80", "--size", "16", "--epochs", "1",
            "--methods", "mimmx"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (mimmx(?: \+ invariant head)?) \|((?: [\d.]+ \|){7})$", out, flags=re.MULTILINE)
    assert [name for name, _ in rows] == ["mimmx", "mimmx + invariant head"], out[-3000:]
    reports = re.findall(r"^  mimmx(?: \+ invariant head)?: (\S+)$", out, flags=re.MULTILINE)
    assert reports and all(Path(report).is_file() for report in reports)
    versions = MlflowClient().search_model_versions("name = 'mimmx_brain'")
    assert len(versions) == 2 and all(version.status == "READY" for version in versions)
    # run again: both runs finished, so they are evaluated again and not retrained or registered twice
    assert main(argv) == 0
    assert "was trained by an earlier demo" in capsys.readouterr().out
    assert len(MlflowClient().search_model_versions("name = 'mimmx_brain'")) == 2


def test_a_demo_cohort_too_small_to_validate_stops_after_the_split_naming_the_fix(repository_copy: Path):
    with pytest.raises(SystemExit, match=r"val\.csv holds no usable image: .*; here, give --subjects more than 48"):
        main(["demo", "--workdir", str(repository_copy / "brain"), "--subjects", "48", "--size", "16", "--epochs", "1"])


def test_the_demo_outside_the_repository_root_says_where_to_run_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--workdir", str(tmp_path / "demo")]) == 2
    assert "run it from the repository root, where bundles/ is" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists(), "it stops before generating the cohort"


@pytest.mark.parametrize(("option", "value"), [("--size", "0"), ("--epochs", "0"), ("--subjects", "0"), ("--seed", "-1")])
def test_the_demo_refuses_counts_below_their_minimum_before_any_work(repository_copy: Path, capsys, option, value):
    # --size 0 used to preprocess every volume at its own shape (ResizeWithPadOrCrop's "keep" value)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--workdir", str(repository_copy / "brain"), option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}: must be at least" in capsys.readouterr().err
    assert not (repository_copy / "brain").exists()


def test_a_preparation_stopped_midway_is_finished_on_the_rerun_not_taken_as_whole(repository_copy: Path, monkeypatch):
    # Stopped while preprocessing NAKO, the demo (and the benchmark's brain stand-in) used to leave
    # processed/nako with a manifest of the images done so far, which every later run took as whole.
    import mimm_med.data.preprocess as preprocessing
    from mimm_med.commands.demo import prepare

    real_run_tasks, calls = preprocessing.run_tasks, []

    def stopped_in_the_second(todo, config, workers):
        calls.append(len(todo))
        for index, result in enumerate(real_run_tasks(todo, config, workers)):
            if len(calls) == 2 and index == 5:
                raise KeyboardInterrupt  # Ctrl-C after five NAKO images
            yield result

    monkeypatch.setattr(preprocessing, "run_tasks", stopped_in_the_second)
    workdir = repository_copy / "brain"
    with pytest.raises(KeyboardInterrupt):
        prepare(workdir, subjects=60, resolution_mm=6.0, size=16, correlation=0.9, seed=0)
    assert not (workdir / "processed" / "nako").exists() and not (workdir / "splits").exists()
    splits = prepare(workdir, subjects=60, resolution_mm=6.0, size=16, correlation=0.9, seed=0)
    assert calls == [60, 60, 55]  # the rerun resumed NAKO's preprocessing, UKB's was complete
    manifest = (workdir / "processed" / "nako" / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 1 + 60 and all(line.endswith(",ok") for line in manifest[1:])
    assert not (workdir / "processed" / "nako.partial").exists() and (splits / "train.csv").is_file()
