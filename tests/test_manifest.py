"""Manifest schema: reading, writing, validation errors that name the file and the fix."""

from __future__ import annotations

import json
import re
import warnings
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


@pytest.mark.parametrize("content, message", [(b"", "cannot be read as CSV"), ("sub\u00e9".encode("utf-16"), "is not UTF-8 text")])
def test_a_manifest_pandas_cannot_read_is_named(tmp_path, content, message):
    path = tmp_path / "manifest.csv"
    path.write_bytes(content)
    with pytest.raises(ManifestError, match=rf"manifest .*manifest.csv {message}"):
        load_manifest(path)


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
    with pytest.raises(ManifestError, match=r"'train' and 'test-iid' share 1 subject \(sub-3\)"):
        validate_splits({"train": train, "test-iid": test})
    validate_splits({"test-iid": test, "test-inverted": test})  # held-out subjects under other correlations


def test_merge_refuses_label_codings_that_clash_but_not_value_sets_that_differ(tmp_path):
    letters = make_manifest(tmp_path / "letters", sex=["F", "M"] * 4)
    words = make_manifest(tmp_path / "words", cohort="nako")
    with pytest.raises(ManifestError, match=r"label 'sex' looks coded differently .*letters.*has \[F, M\].*"
                                            r"words.*has \[female, male\].*labels\.sex\.values"):
        merge_manifests([letters, words])
    capitals = make_manifest(tmp_path / "capitals", cohort="nako", sex=["Female", "male"] * 4)
    with pytest.raises(ManifestError, match=r"'Female' and 'female' look like one value spelt two ways"):
        merge_manifests([words, capitals])
    codes = make_manifest(tmp_path / "codes", cohort="nako", sex=[0, 1] * 4)
    with pytest.raises(ManifestError, match="numbers in some manifests, text in others"):
        merge_manifests([words, codes])
    # A one-sex cohort, and sites of each cohort's own, are no clash.
    men = make_manifest(tmp_path / "men", cohort="nako", sex="male", site=["berlin", "essen"] * 4)
    sites = make_manifest(tmp_path / "sites", site=["cheadle", "reading"] * 4)
    assert merge_manifests([sites, men])["sex"].value_counts().to_dict() == {"male": 12, "female": 4}


def test_merge_checks_that_the_ok_images_exist(tmp_path):
    ukb = make_manifest(tmp_path / "ukb")
    nako = make_manifest(tmp_path / "nako", cohort="nako")
    (tmp_path / "nako" / "images" / "sub-0003" / "img-0.png").unlink()
    with pytest.raises(ManifestError, match=r"1 of 8 images listed in manifest .*nako.*manifest.csv are missing"):
        merge_manifests([ukb, nako])


def test_empty_images_and_a_manifest_moved_from_its_images_are_named_with_their_fix(tmp_path):
    path = make_manifest(tmp_path / "a")
    (tmp_path / "a" / "images" / "sub-0002" / "img-0.png").write_bytes(b"")  # as a partial copy leaves it
    with pytest.raises(ManifestError, match=r"1 of 8 images listed in manifest .* are empty files \(.*sub-0002.*\); re-run"):
        load_manifest(path)
    moved = tmp_path / "elsewhere" / "manifest.csv"
    moved.parent.mkdir()
    path.rename(moved)
    with pytest.raises(ManifestError, match=r"none of the 8 images listed in manifest .*elsewhere.* exist .*if the manifest was moved away from its images, move it back"):
        load_manifest(moved)


def record_key(folder: Path, fingerprint: str) -> None:
    (folder / "pipeline.json").write_text(json.dumps({"spacing": [2, 2, 2], "pseudonym_key_fingerprint": fingerprint}))


def test_merge_refuses_one_cohort_pseudonymised_with_two_keys(tmp_path):
    first = make_manifest(tmp_path / "first")
    second = make_manifest(tmp_path / "second", n=10).parent
    table = pd.read_csv(second / "manifest.csv").iloc[8:]  # other subjects than first's, same cohort
    table.to_csv(second / "manifest.csv", index=False)
    record_key(first.parent, "key-aaaa")
    record_key(second, "key-bbbb")
    with pytest.raises(ManifestError, match=r"first.*manifest.csv and .*second.*manifest.csv both hold cohort 'ukb' "
                                            r"but were pseudonymised with different keys.*first.*pipeline.json"):
        merge_manifests([first, second / "manifest.csv"])
    record_key(second, "key-aaaa")
    assert len(merge_manifests([first, second / "manifest.csv"])) == 10
    nako = make_manifest(tmp_path / "nako", cohort="nako")
    record_key(nako.parent, "key-cccc")  # the cohort is hashed into every pseudonym: keys of its own are safe
    assert len(merge_manifests([first, nako])) == 16


def test_a_blank_image_cell_is_an_error_naming_the_line(tmp_path):
    path = make_manifest(tmp_path, n=4)
    table = pd.read_csv(path)
    table.loc[2, "image"] = None
    table.to_csv(path, index=False)
    with pytest.raises(ManifestError, match=rf"manifest {path}: image is blank in 1 rows \(line 4\)"):
        load_manifest(path)


def test_validation_names_the_csv_lines_of_the_rows_at_fault(tmp_path):
    # lines: 1 header, 2.. rows; the failed row 0 (line 2) is dropped first and must not shift the numbering
    path = make_manifest(tmp_path, n=6, status=["failed", "ok", "ok", "ok", "ok", "ok"], age=[50.0, 51, None, 53, None, 55])
    with pytest.raises(ManifestError, match=r"label 'age' is missing in 2 rows \(subjects sub-0002, sub-0004; lines 4, 6\)"):
        load_manifest(path)
    path = make_manifest(tmp_path, n=4, sex=["female", "male", "M", "female"])
    with pytest.raises(ManifestError, match=r"outside \['female', 'male'\] in 1 rows \(line 4\)"):
        load_manifest(path, label_values={"sex": ["female", "male"]})
    assert load_manifest(make_manifest(tmp_path, n=4, status=["failed", "ok", "ok", "ok"])).index.tolist() == [0, 1, 2]


def test_a_bundle_whose_label_levels_do_not_fit_the_manifest_is_told_the_ones_that_do(tmp_path):
    from mimm_med.data.datalist import manifest_datalist

    manifest = make_manifest(tmp_path, n=4, cohort="mystudy", age_group=["young", "old", "old", "young"],
                             site_group=["north", "north", "south", "south"])
    stand_in = {"age_group": ["young", "old"], "sex": ["female", "male"], "cohort": ["nako", "ukb"]}
    own = {"age_group": ["young", "old"], "sex": ["female", "male"], "site_group": ["north", "south"]}
    with pytest.raises(ManifestError, match="label 'cohort' has values") as error:
        manifest_datalist(manifest, stand_in, primary="age_group")
    assert str(error.value).endswith(f'(the same in training, evaluation and inference): --label_levels "{own}"')
    assert [row["site_group"] for row in manifest_datalist(manifest, own, primary="age_group")] == [0, 0, 1, 1]
    (tmp_path / "images" / "sub-0000" / "img-0.png").unlink()
    with pytest.raises(ManifestError, match="are missing") as error:  # not the labels: no hint about them
        manifest_datalist(manifest, own, primary="age_group")
    assert "--label_levels" not in str(error.value)
    with pytest.raises(ManifestError, match=r"primary 'age' is not a factor of label_levels \['age_group', 'sex', 'site_group'\]: give --primary one of them"):
        manifest_datalist(manifest, own, primary="age")  # was a KeyError: 'age'


def test_a_listed_label_value_that_no_image_has_is_warned_of(tmp_path):
    from mimm_med.data.datalist import manifest_datalist

    levels = {"digit": ["0", "1", "2"], "thickness": ["0", "1"]}
    manifest = make_manifest(tmp_path, n=4, digit=["0", "1", "1", "0"], thickness=["0", "1", "1", "0"])
    # before: silent, and the head kept a class that no training image ever had
    with pytest.warns(UserWarning, match=r"manifest.csv: no image has digit '2', which label_levels lists"):
        records = manifest_datalist(manifest, levels, primary="digit")
    assert [record["digit"] for record in records] == [0, 1, 1, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manifest_datalist(manifest, {**levels, "digit": ["0", "1"]}, primary="digit")


def test_a_stray_label_value_gets_no_advice_to_leave_the_label_out(tmp_path):
    from mimm_med.data.datalist import manifest_datalist

    levels = {"digit": ["0", "1"], "thickness": ["0", "1"]}
    manifest = make_manifest(tmp_path, n=4, digit=["0", "1", "7", "0"], thickness=["0", "1", "1", "0"])
    with pytest.raises(ManifestError, match=r"label 'digit' has values \['7'\] outside") as error:
        manifest_datalist(manifest, levels, primary="digit")
    assert "--label_levels" not in str(error.value) and "--primary <label>" not in str(error.value)


def test_inference_refuses_a_manifest_without_an_image_to_predict(tmp_path):
    from mimm_med.data.datalist import image_datalist

    manifest = make_manifest(tmp_path, n=2, status=["failed", "failed"])
    with pytest.raises(ManifestError, match=rf"{re.escape(str(manifest))} lists no image to predict"):
        image_datalist(manifest)


def test_a_split_folder_that_a_bundle_must_not_read_is_refused_before_training(tmp_path):
    from mimm_med.data.datalist import check_split_folder

    def write_split(name: str, subjects: range, status: str = "ok") -> None:
        table = pd.read_csv(make_manifest(tmp_path, n=12))
        table.iloc[list(subjects)].assign(status=status).to_csv(tmp_path / f"{name}.csv", index=False)

    write_split("train", range(0, 6))
    with pytest.raises(ManifestError, match=r"no manifest at .*val\.csv: make the splits with"):
        check_split_folder(tmp_path)
    write_split("val", range(6, 8), status="failed")
    with pytest.raises(ManifestError, match=r"val\.csv holds no usable image: .*--fractions TRAIN,VAL,TEST"):
        check_split_folder(tmp_path)
    check_split_folder(tmp_path, required=())  # evaluation reads the test sets, not val
    write_split("val", range(6, 8))
    for test_set in ("test-iid", "test-inverted"):
        write_split(test_set, range(8, 12))  # the test sets are the same subjects under other shortcuts
    check_split_folder(tmp_path)
    write_split("val", range(4, 8))  # as a hand-edited val.csv with rows copied from train.csv
    with pytest.raises(ManifestError, match=rf"{re.escape(str(tmp_path))}: splits 'train' and 'val' share 2 subjects \(sub-0004, sub-0005\)"):
        check_split_folder(tmp_path)


def test_merge_refuses_manifests_preprocessed_with_other_pipeline_settings(tmp_path):
    ukb = make_manifest(tmp_path / "ukb")
    nako = make_manifest(tmp_path / "nako", cohort="nako")
    record_key(ukb.parent, "key-aaaa")
    (nako.parent / "pipeline.json").write_text(
        json.dumps({"spacing": [4, 4, 4], "description": "coarser", "pseudonym_key_fingerprint": "key-bbbb"})
    )
    # was: merged, 2 mm and 4 mm images in one manifest (the cohort readable off the voxel size)
    with pytest.raises(ManifestError, match=r"ukb.*manifest.csv and .*nako.*manifest.csv were preprocessed with other "
                                            r"pipeline settings \(spacing differ: spacing: \[2, 2, 2\] in .*ukb.*pipeline.json, "
                                            r"\[4, 4, 4\] in .*nako.*pipeline.json\)"):
        merge_manifests([ukb, nako])
    record_key(nako.parent, "key-bbbb")  # the same settings, keys of their own, another description: merged
    assert len(merge_manifests([ukb, nako])) == 16


@pytest.mark.parametrize(
    "rows, lines",
    [
        (["sub-1,a.png,female,ukb,ok,", "sub-2,b.png,male,ukb,ok,"], "lines 2, 3"),  # trailing commas
        (["sub-1,a.png,female,ukb,ok,extra", "sub-2,b.png,male,ukb,ok"], "line 2"),  # a value added by hand
    ],
)
def test_a_first_row_with_more_fields_than_the_header_is_named_not_read_shifted(tmp_path, rows, lines):
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join(["subject_id,image,sex,cohort,status", *rows]) + "\n")
    # was: pandas took subject_id as row names and read every column as the next (a TypeError, or shifted labels)
    with pytest.raises(ManifestError, match=rf"manifest .*manifest.csv: {lines} of the CSV ha(s|ve) more fields than its "
                                            r"header's 5 \(subject_id, image, sex, cohort, status\); remove the extra"):
        read_manifest(path)
