"""Manifest schema: reading, writing, validation errors that name the file and the fix."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mimm_med.data.manifest import (
    ManifestError,
    load_manifest,
    merge_manifests,
    read_manifest,
    validate_splits,
    write_manifest,
)


def make_manifest(folder: Path, n: int = 8, name: str = "manifest.csv", **columns) -> Path:
    """A manifest of ``n`` ok images (tiny files) in ``folder``; ``columns`` replace or add columns."""
    images = []
    for i in range(n):
        image = folder / "images" / f"sub-{i:04x}" / "img-0.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(b"png")
        images.append(f"images/sub-{i:04x}/img-0.png")
    table = pd.DataFrame(
        {
            "subject_id": [f"sub-{i:04x}" for i in range(n)],
            "image": images,
            "sex": [("female", "male")[i % 2] for i in range(n)],
            "age": [50.0 + i for i in range(n)],
            "cohort": "ukb",
            "status": "ok",
        }
    )
    for key, value in columns.items():
        table[key] = value
    path = folder / name
    table.to_csv(path, index=False)
    return path


def test_round_trip_keeps_paths_relative_to_the_manifest(tmp_path):
    path = make_manifest(tmp_path / "a")
    table = load_manifest(path)
    assert Path(table["image"][0]).is_absolute() and Path(table["image"][0]).exists()
    moved = write_manifest(table, tmp_path / "b" / "c" / "manifest.csv")
    assert pd.read_csv(moved)["image"][0] == "../../a/images/sub-0000/img-0.png"
    assert read_manifest(moved)["image"].tolist() == table["image"].tolist()


def test_missing_columns(tmp_path):
    path = make_manifest(tmp_path)
    pd.read_csv(path).drop(columns="status").to_csv(path, index=False)
    with pytest.raises(ManifestError, match=r"manifest .*manifest.csv lacks columns \['status'\].*mimm-med preprocess"):
        load_manifest(path)


def test_missing_files_are_counted_and_the_first_named(tmp_path):
    path = make_manifest(tmp_path, n=10)
    for i in range(7):
        (tmp_path / "images" / f"sub-{i:04x}" / "img-0.png").unlink()
    with pytest.raises(ManifestError) as error:
        load_manifest(path)
    message = str(error.value)
    assert "7 of 10 images" in message and str(path) in message and "re-run `mimm-med preprocess`" in message
    assert "sub-0000" in message and "sub-0004" in message and "sub-0005" not in message and "(7 in all)" in message


def test_failed_rows_are_left_out_unless_asked_for(tmp_path):
    path = make_manifest(tmp_path, status=["ok"] * 6 + ["failed"] * 2)
    (tmp_path / "images" / "sub-0007" / "img-0.png").unlink()
    assert len(load_manifest(path)) == 6
    assert len(load_manifest(path, include_failed=True)) == 8


def test_labels_outside_the_allowed_values(tmp_path):
    path = make_manifest(tmp_path, sex=["female", "male", "M", "female"] * 2)
    with pytest.raises(ManifestError, match=r"label 'sex' has values \['M'\] outside \['female', 'male'\] in 2 rows"):
        load_manifest(path, label_values={"sex": ["female", "male"], "age": None})
    with pytest.raises(ManifestError, match=r"lacks label columns \['age_group'\]"):
        load_manifest(path, label_values={"age_group": [0, 1]})


def test_status_other_than_ok_or_failed_is_refused_not_dropped(tmp_path):
    path = make_manifest(tmp_path, status=["ok"] * 6 + ["done", None])
    with pytest.raises(ManifestError, match=r"status must be 'ok' or 'failed', but 2 rows \(subjects sub-0006, sub-0007\) hold \['done', 'nan'\]"):
        load_manifest(path)


def test_cohort_used_as_a_label_is_checked_like_one(tmp_path):
    path = make_manifest(tmp_path, cohort=["ukb", "nako", "chexpert", None] * 2)
    with pytest.raises(ManifestError, match=r"label 'cohort' is missing in 2 rows"):
        load_manifest(path, label_values={"cohort": ["nako", "ukb"]})
    path = make_manifest(tmp_path, cohort=["ukb", "nako", "chexpert", "ukb"] * 2)
    with pytest.raises(ManifestError, match=r"label 'cohort' has values \['chexpert'\] outside \['nako', 'ukb'\]"):
        load_manifest(path, label_values={"cohort": ["nako", "ukb"]})
    assert len(load_manifest(path)) == 8  # not a label unless asked for


def test_numeric_label_values_match_however_they_are_spelled(tmp_path):
    path = make_manifest(tmp_path, sex=[0, 1] * 4)
    assert len(load_manifest(path, label_values={"sex": [0.0, 1.0]})) == 8
    assert len(load_manifest(path, label_values={"sex": ["0", "1"]})) == 8


def test_missing_labels(tmp_path):
    path = make_manifest(tmp_path, age=[50.0, None] * 4)
    with pytest.raises(ManifestError, match=r"label 'age' is missing in 4 rows .*sub-0001"):
        load_manifest(path)


def test_duplicate_images(tmp_path):
    path = make_manifest(tmp_path)
    table = pd.read_csv(path)
    pd.concat([table, table.iloc[:2]]).to_csv(path, index=False)
    with pytest.raises(ManifestError, match="lists 2 images more than once"):
        load_manifest(path)


def test_merge_requires_the_same_labels_and_distinct_images(tmp_path):
    ukb = make_manifest(tmp_path / "ukb")
    nako = make_manifest(tmp_path / "nako", cohort="nako")
    assert set(merge_manifests([ukb, nako])["cohort"]) == {"ukb", "nako"}
    with pytest.raises(ManifestError, match="appear in more than one"):
        merge_manifests([ukb, ukb])
    other = make_manifest(tmp_path / "other", name="m.csv", smoker=0)
    with pytest.raises(ManifestError, match=r"label columns differ: .*m.csv has \['age', 'sex', 'smoker'\]"):
        merge_manifests([ukb, other])


def test_splits_sharing_a_subject_are_refused():
    train = pd.DataFrame({"subject_id": ["sub-1", "sub-2", "sub-3"]})
    test = pd.DataFrame({"subject_id": ["sub-4", "sub-3"]})
    validate_splits({"train": train, "val": test.iloc[:1]})
    with pytest.raises(ManifestError, match=r"'train' and 'test-iid' share 1 subjects \(sub-3\)"):
        validate_splits({"train": train, "test-iid": test})
    validate_splits({"test-iid": test, "test-inverted": test})  # held-out subjects under other correlations
