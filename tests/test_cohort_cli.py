"""``mimm-med cohort`` and ``mimm-med preprocess`` from the command line."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_manifest import make_manifest

from mimm_med.cli import main
from mimm_med.data.manifest import read_manifest

SUBCOMMANDS = [["preprocess"], ["cohort"], ["cohort", "generate"], ["cohort", "merge"], ["cohort", "split"],
               ["cohort", "describe"]]


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: mimm-med " + " ".join(command) in capsys.readouterr().out


def confounded_manifest(folder: Path, subjects: int = 1500, seed: int = 0) -> Path:
    """Subjects with one or two images; binary age_group, sex and cohort drawn independently."""
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 3, subjects)
    path = make_manifest(folder, n=int(images.sum()))
    table = pd.read_csv(path)
    subject = np.repeat(np.arange(subjects), images)
    table["subject_id"] = [f"sub-{s:04x}" for s in subject]
    for column, values in {"age_group": ["young", "old"], "sex": ["female", "male"], "cohort": ["ukb", "nako"]}.items():
        table[column] = np.asarray(values)[rng.integers(0, 2, subjects)][subject]
    table.to_csv(path, index=False)
    return path


def test_split_hits_the_correlations_by_subject(tmp_path, capsys):
    manifest = confounded_manifest(tmp_path / "processed")
    out = tmp_path / "splits"
    status = main(["cohort", "split", "--manifest", str(manifest), "--primary", "age_group",
                   "--spurious", "sex=0.9,cohort=0.8", "--out", str(out), "--seed", "3"])
    assert status == 0
    assert "cohort split:" in capsys.readouterr().out
    splits = {name: read_manifest(out / f"{name}.csv") for name in
              ("train", "val", "test-iid", "test-balanced", "test-inverted")}
    subjects = [set(frame["subject_id"]) for frame in splits.values()]
    assert sum(map(len, subjects)) == len(set().union(*subjects))
    for frame in splits.values():
        assert len(frame) > 50 and all(os.path.exists(p) for p in frame["image"])
    cells = pd.read_csv(out / "cells.csv")
    agreement = cells.groupby(["split", "factor"])["agreement"].first()
    expected = {"train": (0.9, 0.8), "val": (0.9, 0.8), "test-iid": (0.9, 0.8), "test-balanced": (0.5, 0.5),
                "test-inverted": (0.1, 0.2)}
    for split, (sex, cohort) in expected.items():
        assert agreement[split, "sex"] == pytest.approx(sex, abs=0.02)
        assert agreement[split, "cohort"] == pytest.approx(cohort, abs=0.02)


def test_split_errors_name_the_problem(tmp_path, capsys):
    manifest = make_manifest(tmp_path)
    status = main(["cohort", "split", "--manifest", str(manifest), "--primary", "age",
                   "--spurious", "sex=0.9", "--out", str(tmp_path / "splits")])
    assert status == 2
    assert "exactly two values" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cohort", "split", "--manifest", str(manifest), "--primary", "sex", "--spurious", "cohort", "--out", "x"])


def test_merge_rewrites_paths_and_keeps_cohorts_apart(tmp_path, capsys):
    ukb = make_manifest(tmp_path / "ukb")
    nako = make_manifest(tmp_path / "nako", cohort="nako")
    merged_path = tmp_path / "both" / "manifest.csv"
    assert main(["cohort", "merge", str(ukb), str(nako), "--out", str(merged_path)]) == 0
    merged = pd.read_csv(merged_path)
    assert merged["image"].str.startswith("../").all()
    assert merged["cohort"].value_counts().to_dict() == {"ukb": 8, "nako": 8}
    assert all(os.path.exists(p) for p in read_manifest(merged_path)["image"])
    assert main(["cohort", "merge", str(ukb), str(ukb), "--out", str(merged_path)]) == 2
    assert "more than one" in capsys.readouterr().err


def test_describe_prints_counts_and_plots_crosstabs(tmp_path, capsys):
    manifest = confounded_manifest(tmp_path, subjects=60)
    assert main(["cohort", "describe", str(manifest), "--primary", "age_group"]) == 0
    out = capsys.readouterr().out
    assert "age_group: old" in out and "sex: female" in out and "cohort: nako" in out
    assert "age: (" in out  # many-valued numbers are counted in quartile bins
    assert (tmp_path / "manifest-crosstab.png").read_bytes().startswith(b"\x89PNG")
