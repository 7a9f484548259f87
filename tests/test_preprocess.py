"""Preprocessing runner and pipelines: nothing lost, nothing leaked, resumable, shardable."""

from __future__ import annotations

import errno
import faulthandler
import json
import os
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from monai.data import ITKReader
from monai.utils import OptionalImportError
from PIL import Image
from preprocess_fixtures import (
    BRAIN_CONFIG,
    BRAIN_FAILURES,
    KEY,
    PLANTED,
    SMALL_BRAIN,
    SMALL_XRAY,
    XRAY_CONFIG,
    XRAY_FAILURES,
    brain_cohort,
    head_volume,
    radiograph,
    searchable_bytes,
    write_nifti,
    write_dicom_xray,
    write_png,
    xray_cohort,
)

from mimm_med.data.manifest import merge_manifests, read_manifest
from mimm_med.data.preprocess import (
    OutputError,
    PreprocessError,
    PreprocessPipeline,
    Shard,
    check_output_settings,
    describe_error,
    load_pipeline_config,
    parse_override,
    preprocess_records,
    unmask_file,
)
from mimm_med.data.pseudonym import Pseudonymiser, PseudonymKeyError, resolve_key
from mimm_med.data.writers import ImageFileWriter, atomic_output


def run(records, problems, raw, out, config=BRAIN_CONFIG, overrides=SMALL_BRAIN, key=KEY, **kwargs):
    config = load_pipeline_config(config, overrides)
    return preprocess_records(records, problems, config, raw, out, Pseudonymiser(key), progress=False, **kwargs)


def all_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw_brain")
    return (raw, *brain_cohort(raw))


@pytest.fixture(scope="module")
def brain_reference(brain, tmp_path_factory):
    """One uninterrupted run: the manifest and error report every other run must reproduce."""
    raw, records, problems = brain
    out = tmp_path_factory.mktemp("brain_reference")
    return out, run(records, problems, raw, out)


def reason_of(errors: pd.DataFrame, source_id: str, cohort: str) -> str:
    subject = Pseudonymiser(KEY).subject(cohort, source_id)
    return " ".join(errors.loc[errors["subject_id"] == subject, "reason"])


def test_brain_bad_files_are_reported_and_the_rest_complete(brain, brain_reference):
    raw, records, problems = brain
    out, summary = brain_reference
    assert (summary.done, summary.skipped, summary.failed, summary.problems) == (5, 0, 4, 1)
    assert not summary.ok
    errors = pd.read_csv(summary.errors)
    assert len(errors) == len(BRAIN_FAILURES)
    for source_id, reason in BRAIN_FAILURES.items():
        assert reason in reason_of(errors, source_id, "ukb"), errors
    manifest = read_manifest(summary.manifest)
    assert manifest["status"].value_counts().to_dict() == {"ok": 5, "failed": 4}
    assert list(manifest.columns) == ["subject_id", "image", "sex", "age_group", "cohort", "status"]
    for path in manifest.loc[manifest["status"] == "ok", "image"]:
        image = nib.load(path)
        assert image.shape == (16, 16, 16) and image.get_data_dtype() == np.float32
        data = image.get_fdata()
        assert 0.0 <= data.min() and data.max() <= 1.0 and data.max() > 0.9
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert np.allclose(np.abs(np.diag(image.affine)[:3]), 2.0)


def test_xray_formats_and_bad_files(tmp_path):
    records, problems = xray_cohort(tmp_path / "raw")
    summary = run(records, problems, tmp_path / "raw", tmp_path / "out", XRAY_CONFIG, SMALL_XRAY)
    assert (summary.done, summary.failed) == (7, 3)
    errors = pd.read_csv(summary.errors)
    for source_id, reason in XRAY_FAILURES.items():
        assert reason in reason_of(errors, source_id, "chexpert_plus"), errors
    manifest = read_manifest(summary.manifest)
    for path in manifest.loc[manifest["status"] == "ok", "image"]:
        image = Image.open(path)
        assert image.size == (32, 32) and image.mode == "I;16"


def test_monochrome1_comes_out_like_monochrome2(tmp_path):
    pipeline = PreprocessPipeline(load_pipeline_config(XRAY_CONFIG, SMALL_XRAY))
    pixels = radiograph()
    images = {
        name: np.asarray(Image.open(pipeline(path, tmp_path / name)), dtype=np.float64)
        for name, path in {
            "mono2": write_dicom_xray(tmp_path / "mono2.dcm", pixels),
            "mono1": write_dicom_xray(tmp_path / "mono1.dcm", 4095 - pixels, "MONOCHROME1"),
            "png": write_png(tmp_path / "same.png", pixels),
        }.items()
    }
    assert np.array_equal(images["mono1"], images["mono2"])
    assert np.array_equal(images["png"], images["mono2"])
    # The bright block stays top-left; 40 x 30 becomes 32 x 24, padded with 4 black columns each side.
    mono2 = images["mono2"]
    assert mono2[:8, 4:12].mean() > 2 * mono2[24:, 4:12].mean()
    assert mono2[:, :4].max() == 0 and mono2[:, -4:].max() == 0 and mono2[:, 4:-4].min() > 0


def test_blank_image_is_an_error_not_a_black_output(tmp_path):
    pipeline = PreprocessPipeline(load_pipeline_config(BRAIN_CONFIG, SMALL_BRAIN))
    blank = write_nifti(tmp_path / "blank.nii.gz", np.zeros((24, 24, 24), np.float32))
    with pytest.raises(RuntimeError) as error:
        pipeline(blank, tmp_path / "out")
    assert "the image is blank" in describe_error(error.value)
    assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("shape", [(24, 24, 1), (2, 2, 2), (3, 24, 24)], ids=["one-slice", "tiny-block", "three-slices"])
def test_a_single_slice_or_fragment_is_an_error_not_an_output_of_padding(tmp_path, shape):
    pipeline = PreprocessPipeline(load_pipeline_config(BRAIN_CONFIG, SMALL_BRAIN))
    volume = np.random.default_rng(0).uniform(1, 2, shape).astype(np.float32)
    fragment = write_nifti(tmp_path / "fragment.nii.gz", volume)
    with pytest.raises(RuntimeError) as error:
        pipeline(fragment, tmp_path / "out")
    assert f"of at least 4 voxels along each axis, got spatial shape {shape}" in describe_error(error.value)
    assert not list(tmp_path.glob("out*"))


def test_a_radiograph_of_one_row_is_an_error():
    from mimm_med.data.transforms import ValidateImaged

    line = np.random.default_rng(0).uniform(size=(1, 1, 64))
    with pytest.raises(ValueError, match=r"of at least 2 voxels along each axis, got spatial shape \(1, 64\)"):
        ValidateImaged("image", spatial_dims=2)({"image": line})


def test_clahe_and_8_bit_png_and_nifti_outputs_are_config_settings(tmp_path):
    path = write_png(tmp_path / "in.png", radiograph())
    plain = PreprocessPipeline(load_pipeline_config(XRAY_CONFIG, {**SMALL_XRAY, "png_bit_depth": 8}))
    equalised = PreprocessPipeline(load_pipeline_config(XRAY_CONFIG, {**SMALL_XRAY, "png_bit_depth": 8, "clahe": True}))
    nifti = PreprocessPipeline(load_pipeline_config(XRAY_CONFIG, {**SMALL_XRAY, "output_format": "nifti"}))
    a = np.asarray(Image.open(plain(path, tmp_path / "plain")))
    b = np.asarray(Image.open(equalised(path, tmp_path / "clahe")))
    assert a.dtype == np.uint8 and b.shape == a.shape and not np.array_equal(a, b)
    assert nib.load(nifti(path, tmp_path / "x")).shape == (32, 32)


def test_no_identifier_reaches_any_output(tmp_path, brain, brain_reference, capfd):
    raw, records, problems = brain
    xray_records, xray_problems = xray_cohort(tmp_path / "raw")
    run(xray_records, xray_problems, tmp_path / "raw", tmp_path / "xray", XRAY_CONFIG, SMALL_XRAY, workers=2)
    captured = capfd.readouterr()
    source_ids = [*records["source_id"], *problems["source_id"], *xray_records["source_id"]]
    forbidden = [*PLANTED, *source_ids, str(raw), str(tmp_path / "raw")]
    roots = [tmp_path / "xray", brain_reference[0]]
    outputs = [(root, path) for root in roots for path in all_files(root)]
    assert len(outputs) > 15
    for root, path in outputs:
        content, name = searchable_bytes(path), str(path.relative_to(root))
        for text in forbidden:
            assert text.encode() not in content, f"{text!r} leaked into {path}"
            assert text not in name, f"{text!r} leaked into the name {name}"
    for text in forbidden:
        assert text not in captured.out + captured.err


def test_interrupted_run_resumes_to_the_same_manifest(brain, brain_reference, tmp_path, monkeypatch):
    raw, records, problems = brain
    reference = brain_reference[1]
    calls = []
    original = PreprocessPipeline.__call__

    def interrupted(self, source, stem):
        calls.append(source)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, source, stem)

    monkeypatch.setattr(PreprocessPipeline, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(records, problems, raw, tmp_path, workers=0)  # in this process, so Ctrl-C comes at the third image
    monkeypatch.undo()
    assert not [p for p in all_files(tmp_path) if p.name.startswith(".tmp-")]
    assert len(read_manifest(tmp_path / "manifest.csv")) == 2
    summary = run(records, problems, raw, tmp_path)
    assert summary.skipped == 2
    assert (tmp_path / "manifest.csv").read_text() == reference.manifest.read_text()
    assert (tmp_path / "errors.csv").read_text() == reference.errors.read_text()


def test_a_worker_killed_once_costs_nothing(brain, brain_reference, tmp_path, monkeypatch):
    raw, records, problems = brain
    reference = brain_reference[1]
    marker = tmp_path / "killed-once"
    original = PreprocessPipeline.__call__

    def dies_once(self, source, stem):  # the out-of-memory killer, say, while 8 images were in flight
        if Path(source).parent.parent.name.startswith("1000003") and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, source, stem)

    monkeypatch.setattr(PreprocessPipeline, "__call__", dies_once)
    summary = run(records, problems, raw, tmp_path / "out", workers=2)
    assert marker.exists() and (summary.done, summary.failed) == (reference.done, reference.failed)
    assert (tmp_path / "out" / "manifest.csv").read_text() == reference.manifest.read_text()
    assert (tmp_path / "out" / "errors.csv").read_text() == reference.errors.read_text()


@pytest.mark.parametrize("workers", [1, 2])  # one worker, the default, also keeps the run out of harm's way
def test_an_image_that_kills_its_worker_fails_alone(brain, brain_reference, tmp_path, monkeypatch, workers):
    raw, records, problems = brain
    reference = brain_reference[1]
    original = PreprocessPipeline.__call__

    def segfaults(self, source, stem):  # a reader crashing on one file, every time
        if Path(source).parent.parent.name.startswith("1000003"):
            faulthandler.disable()  # pytest's handler would print every loaded module into the log
            os.kill(os.getpid(), signal.SIGSEGV)
        return original(self, source, stem)

    monkeypatch.setattr(PreprocessPipeline, "__call__", segfaults)
    for _ in range(2):  # and a re-run finishes too, rather than dying on that file again
        summary = run(records, problems, raw, tmp_path / "out", workers=workers)
        assert (summary.done + summary.skipped, summary.failed) == (reference.done - 1, reference.failed + 1)
    errors = pd.read_csv(summary.errors)
    assert len(errors) == len(BRAIN_FAILURES) + 1
    assert "worker process died" in reason_of(errors, "1000003", "ukb")
    manifest = read_manifest(summary.manifest)
    subject = Pseudonymiser(KEY).subject("ukb", "1000003")
    assert manifest.loc[manifest["subject_id"] == subject, "status"].tolist() == ["failed"]
    assert len(manifest) == len(records)


def test_rerun_redoes_only_missing_and_failed_images(brain, brain_reference, tmp_path):
    raw, records, problems = brain
    first = run(records, problems, raw, tmp_path)
    manifest = read_manifest(first.manifest)
    os.remove(manifest.loc[manifest["status"] == "ok", "image"].iloc[0])
    second = run(records, problems, raw, tmp_path)
    assert (second.done, second.skipped, second.failed) == (1, first.done - 1, first.failed)
    assert second.manifest.read_text() == brain_reference[1].manifest.read_text()


def test_an_emptied_output_image_is_redone_not_skipped(brain, brain_reference, tmp_path):
    raw, records, problems = brain
    first = run(records, problems, raw, tmp_path)
    manifest = read_manifest(first.manifest)
    emptied = Path(manifest.loc[manifest["status"] == "ok", "image"].iloc[0])
    emptied.write_bytes(b"")  # outside damage, or a partial copy: nibabel's "Empty file" in training
    second = run(records, problems, raw, tmp_path)
    assert (second.done, second.skipped, second.failed) == (1, first.done - 1, first.failed)
    assert nib.load(emptied).shape == (16, 16, 16)
    assert second.manifest.read_text() == brain_reference[1].manifest.read_text()


@pytest.mark.parametrize("workers", [0, 1, 2])  # 0: in this process
def test_a_repeated_record_is_processed_once(brain, brain_reference, tmp_path, workers):
    raw, records, problems = brain
    repeated = pd.concat([records, records.iloc[[0, 0, 1, 1]]], ignore_index=True)
    summary = run(repeated, problems, raw, tmp_path, workers=workers)
    reference = brain_reference[1]
    assert (summary.done, summary.failed) == (reference.done, reference.failed)
    assert summary.manifest.read_text() == reference.manifest.read_text()


def test_shards_union_to_the_full_set(brain, brain_reference, tmp_path):
    raw, records, problems = brain
    parts = [run(records, problems, raw, tmp_path, shard=Shard(i, 3)) for i in range(3)]
    assert sum(p.done + p.failed for p in parts) == len(records)
    assert sum(p.problems for p in parts) == len(problems)
    merged = merge_manifests([p.manifest for p in parts]).sort_values(["subject_id", "image"])
    full = read_manifest(brain_reference[1].manifest)
    relative = [os.path.relpath(p, tmp_path) for p in merged["image"]]
    assert relative == [os.path.relpath(p, brain_reference[0]) for p in full["image"]]
    assert merged.drop(columns="image").reset_index(drop=True).equals(full.drop(columns="image"))
    whole = run(records, problems, raw, tmp_path)
    assert (whole.done, whole.skipped) == (0, sum(p.done for p in parts))


def test_output_folder_made_with_other_settings_is_refused(brain, tmp_path):
    raw, records, problems = brain
    run(records.iloc[:1], problems.iloc[:0], raw, tmp_path)
    with pytest.raises(PreprocessError, match="other pipeline settings"):
        run(records.iloc[:1], problems.iloc[:0], raw, tmp_path, overrides={"spatial_size": [8, 8, 8]})


def test_output_folder_without_images_takes_other_settings(brain, tmp_path, caplog):
    raw, records, problems = brain
    fingerprint = Pseudonymiser(KEY).key_fingerprint
    failing = records.iloc[4:8]  # truncated, NaN, 2D, empty: every image fails, no output depends on the settings
    assert run(failing, problems.iloc[:0], raw, tmp_path).failed == len(failing)
    other = load_pipeline_config(BRAIN_CONFIG, {"spatial_size": [8, 8, 8]})
    with caplog.at_level("WARNING", logger="mimm_med.data.preprocess"):
        summary = run(records.iloc[:1], problems.iloc[:0], raw, tmp_path, overrides={"spatial_size": [8, 8, 8]})
    assert "holds no image made with the pipeline settings recorded in" in caplog.text
    assert summary.done == 1
    assert json.loads((tmp_path / "pipeline.json").read_text()) == {**other, "pseudonym_key_fingerprint": fingerprint}
    # Now an image depends on the settings recorded: the first ones are refused.
    with pytest.raises(PreprocessError, match="other pipeline settings"):
        run(records.iloc[:1], problems.iloc[:0], raw, tmp_path)
    # A folder where no image ran at all (only its record was made) takes other settings too.
    (tmp_path / "none-ran").mkdir()
    check_output_settings(load_pipeline_config(BRAIN_CONFIG, SMALL_BRAIN), tmp_path / "none-ran", fingerprint)
    check_output_settings(other, tmp_path / "none-ran", fingerprint)
    assert json.loads((tmp_path / "none-ran" / "pipeline.json").read_text())["spatial_size"] == [8, 8, 8]


def test_output_folder_made_with_another_key_is_refused(brain, tmp_path):
    raw, records, problems = brain
    run(records.iloc[:2], problems.iloc[:0], raw, tmp_path)
    record = (tmp_path / "pipeline.json").read_text()
    assert Pseudonymiser(KEY).key_fingerprint in record and KEY.decode() not in record
    with pytest.raises(PreprocessError, match=r"another pseudonymisation key .*pipeline.json.*pass the key"):
        run(records, problems.iloc[:0], raw, tmp_path, key=KEY + b"!", shard=Shard(1, 2))
    assert (tmp_path / "pipeline.json").read_text() == record and not list(tmp_path.glob("*shard*"))
    # A folder from before fingerprints were recorded resumes, and gets the fingerprint.
    (tmp_path / "pipeline.json").write_text(json.dumps(load_pipeline_config(BRAIN_CONFIG, SMALL_BRAIN)))
    assert run(records.iloc[:2], problems.iloc[:0], raw, tmp_path).skipped == 2
    assert (tmp_path / "pipeline.json").read_text() == record


@pytest.mark.parametrize("made", [False, True], ids=["new", "existing"])
def test_shards_starting_at_once_share_one_pipeline_record(brain, tmp_path, monkeypatch, made):
    config = load_pipeline_config(BRAIN_CONFIG, SMALL_BRAIN)
    fingerprint = Pseudonymiser(KEY).key_fingerprint
    if made:
        check_output_settings(config, tmp_path, fingerprint)
    record = (tmp_path / "pipeline.json").read_text() if made else None
    original, others = Path.write_text, []

    def another_shard_meanwhile(self, *args, **kwargs):
        written = original(self, *args, **kwargs)
        if self.name.endswith("pipeline.json") and not others:  # shard 1 checks while shard 0 writes
            others.append(self)
            check_output_settings(config, tmp_path, fingerprint)
        return written

    monkeypatch.setattr(Path, "write_text", another_shard_meanwhile)
    check_output_settings(config, tmp_path, fingerprint)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline.json"]
    assert json.loads((tmp_path / "pipeline.json").read_text()) == {**config, "pseudonym_key_fingerprint": fingerprint}
    if made:
        assert (tmp_path / "pipeline.json").read_text() == record


def test_unwritable_out_is_an_output_error_naming_it(brain, tmp_path, monkeypatch):
    raw, records, problems = brain
    (tmp_path / "file").write_text("not a folder")
    for out in (tmp_path / "file", tmp_path / "file" / "out"):
        with pytest.raises(OutputError, match=rf"cannot write --out {out}: {tmp_path / 'file'} is a file, not a folder; choose another folder"):
            run(records, problems, raw, out)

    def read_only(self, *args, **kwargs):  # the tests run as root, whom chmod does not stop
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_text", read_only)
    with pytest.raises(OutputError, match=r"cannot write --out .*: Permission denied \(.*\.new-\d+-\w+-pipeline\.json"):
        run(records, problems, raw, tmp_path / "out")


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_an_image_that_cannot_be_written_stops_the_run(brain, tmp_path, monkeypatch, workers):
    raw, records, problems = brain
    calls = []

    def disk_full(array, affine, path):
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ImageFileWriter, "_write_nifti", staticmethod(disk_full))
    with pytest.raises(OutputError, match=r"cannot write .*images/sub-\w+/img-\w+\.nii\.gz: No space left"):
        run(records, problems, raw, tmp_path, workers=workers)
    manifest = read_manifest(tmp_path / "manifest.csv")  # what finished is recorded: nothing, the inputs are fine
    assert len(manifest) == 0 and not (manifest["status"] == "failed").any()
    if workers == 0:  # workers write where this process cannot count
        assert len(calls) == 1  # the first good image stops the run, not every image of the cohort


@pytest.mark.parametrize("workers", [1, 2])
def test_pipeline_that_cannot_be_built_fails_once_naming_the_cause(brain, tmp_path, monkeypatch, workers):
    raw, records, problems = brain

    def itk_missing(self, *args, **kwargs):
        raise OptionalImportError("required package `itk` is not installed")

    monkeypatch.setattr(ITKReader, "__init__", itk_missing)
    with pytest.raises(PreprocessError, match="cannot be built.*`itk` is not installed"):
        run(records, problems, raw, tmp_path, workers=workers)


def test_overrides_are_parsed_and_checked():
    assert parse_override("spatial_size=[64,64,64]") == ("spatial_size", [64, 64, 64])
    assert parse_override("output_format=png") == ("output_format", "png")
    assert parse_override("clahe=true") == ("clahe", True)
    with pytest.raises(PreprocessError, match="KEY=VALUE"):
        parse_override("spatial_size")
    with pytest.raises(PreprocessError, match="no setting 'spatail_size'"):
        load_pipeline_config(BRAIN_CONFIG, {"spatail_size": [8, 8, 8]})
    with pytest.raises(PreprocessError, match="0 <= i < n"):
        Shard.parse("4/4")


@pytest.mark.parametrize(
    "config, key, value, message",
    [
        (XRAY_CONFIG, "spatial_size", [32, 32], r"spatial_size is a number in \S*chest_xray.json \(default 256\), "
         r"got \[32, 32\]; give a number like the default, e.g. --set spatial_size=256"),
        (BRAIN_CONFIG, "spatial_size", 64, r"spatial_size is a list in \S*brain_t1.json \(default \[96, 96, 96\]\)"),
        (XRAY_CONFIG, "spatial_size", "large", r'spatial_size is a number .* got "large"'),
        (XRAY_CONFIG, "clahe", 1, r"clahe is true or false .*\(default false\), got 1"),
        (XRAY_CONFIG, "output_format", ["png"], r'output_format is text .*\(default "png"\)'),
    ],
    ids=["list-for-number", "number-for-list", "text-for-number", "number-for-bool", "list-for-text"],
)
def test_an_override_of_another_form_than_its_default_is_refused(config, key, value, message):
    with pytest.raises(PreprocessError, match=message):
        load_pipeline_config(config, {key: value})


@pytest.mark.parametrize(
    "config, key, value, message",
    [
        (BRAIN_CONFIG, "spatial_size", [0, 32, 32], r"spatial_size must be whole numbers of at least 1, got \[0, 32, 32\]: MONAI would read 0"),
        (BRAIN_CONFIG, "spatial_size", [32.5, 32, 32], r"spatial_size must be whole numbers of at least 1, got \[32.5, 32, 32\]"),
        (BRAIN_CONFIG, "spatial_size", [32, 32], r"spatial_size must be one number or 3, one per spatial axis, got 2"),
        (BRAIN_CONFIG, "spacing", [0, 2, 2], r"spacing must be positive numbers, got \[0, 2, 2\]: .*own spacing"),
        (BRAIN_CONFIG, "spacing", [2, 2, -1.5], r"spacing must be positive numbers"),
        (XRAY_CONFIG, "spatial_size", 0, r"spatial_size must be whole numbers of at least 1, got 0"),
    ],
    ids=["zero-edge", "fractional-edge", "two-edges-for-3d", "zero-spacing", "negative-spacing", "zero-longest-side"],
)
def test_a_grid_that_would_leave_each_output_its_own_shape_is_refused_before_any_image(config, key, value, message):
    """MONAI reads 0 as "keep the image's own": the outputs would not stack into one batch."""
    with pytest.raises(PreprocessError, match=rf"pipeline cannot be built \(ValueError: {message}.*or the --set that changed it"):
        PreprocessPipeline(load_pipeline_config(config, {key: value}))


def test_overrides_of_the_defaults_form_expressions_and_null_defaults_are_taken(tmp_path):
    assert load_pipeline_config(XRAY_CONFIG, {"spatial_size": 32.0})["spatial_size"] == 32.0  # int, float: numbers
    assert load_pipeline_config(BRAIN_CONFIG, {"spacing": [4, 4, 4]})["spacing"] == [4, 4, 4]
    assert load_pipeline_config(BRAIN_CONFIG, {"spatial_size": "$[16] * 3"})["spatial_size"] == "$[16] * 3"
    nullable = tmp_path / "nullable.json"
    nullable.write_text(json.dumps({"crop": None}))
    assert load_pipeline_config(nullable, {"crop": [8, 8]})["crop"] == [8, 8]


def test_atomic_output_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "image.nii.gz"
    (tmp_path / f".tmp-999999-{target.name}").write_bytes(b"left by a killed process")
    with pytest.raises(KeyboardInterrupt), atomic_output(target) as tmp:
        tmp.write_bytes(b"half a")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_reaches_the_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    target, events = tmp_path / "manifest.csv", []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", str(src))), real_replace(src, dst)))
    with atomic_output(target) as tmp:
        tmp.write_text("subject_id,image\n")
    assert events == [("fsync", str(tmp)), ("replace", str(tmp))]
    assert target.read_text() == "subject_id,image\n"


def test_keys_are_required_and_pseudonyms_keyed(tmp_path):
    with pytest.raises(PseudonymKeyError, match="--key-file"):
        resolve_key(environ={})
    with pytest.raises(PseudonymKeyError, match="at least 16"):
        resolve_key("short", environ={})
    key_file = tmp_path / "pseudonym.key"
    key_file.write_text("from-a-file-0123456789\n")
    assert resolve_key(key_file=key_file, environ={}) == b"from-a-file-0123456789"
    assert resolve_key(environ={"MIMM_MED_PSEUDONYM_KEY": "from-the-environment"}) == b"from-the-environment"
    a, b = Pseudonymiser(KEY), Pseudonymiser(KEY + b"!")
    assert a.subject("ukb", "1000001") == a.subject("ukb", 1000001) == a.subject("ukb", 1000001.0)
    assert a.subject("ukb", " 1000001.0") == a.subject("ukb", "1000001")  # text of a table once saved as floats
    assert a.subject("nako", "012345") != a.subject("nako", "12345")  # leading zeros are part of an id
    assert a.subject("ukb", "1000001") != b.subject("ukb", "1000001")
    assert a.subject("ukb", "1000001") != a.subject("nako", "1000001")


def test_truncated_png_says_it_is_truncated(tmp_path):
    good = write_png(tmp_path / "raw" / "good.png", radiograph())
    truncated = tmp_path / "raw" / "view1_frontal.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    pipeline = PreprocessPipeline(load_pipeline_config(XRAY_CONFIG, SMALL_XRAY))
    with pytest.raises(Exception) as error:  # under MONAI's "applying transform" wrapper
        pipeline(truncated, tmp_path / "out")
    assert describe_error(error.value).startswith("ValueError: truncated or not a valid PNG file")


def test_metadata_rows_carry_their_place_and_rows_without_an_id_no_pseudonym(brain, tmp_path):
    raw, records, _ = brain
    problems = pd.DataFrame(
        {
            "source_id": ["1000010", "", ""],
            "image": [str(raw / "1000010_20252_2_0" / "T1" / "T1.nii.gz"), "", ""],
            # a line number equal to the row's id stays a line number
            "row": ["ukb.csv, line 1000010", "ukb.csv, line 3", "ukb.csv, line 28"],
            "reason": ["age: column '21003-2.0' is blank", "no subject id in column 'eid' ('')",
                       "unreadable row: expected 5 fields, saw 7"],
            "cohort": "ukb",
        }
    )
    summary = run(records.iloc[:1], problems, raw, tmp_path / "whole")
    errors = pd.read_csv(summary.errors, dtype=str, keep_default_na=False)
    pseudonym = Pseudonymiser(KEY).subject("ukb", "1000010")
    assert errors.loc[errors["subject_id"] == pseudonym, "reason"].tolist() == [
        "metadata: ukb.csv, line 1000010: age: column '21003-2.0' is blank"
    ]
    assert errors.loc[errors["subject_id"] == "", "reason"].tolist() == [
        "metadata: ukb.csv, line 3: no subject id in column 'eid' ('')",
        "metadata: ukb.csv, line 28: unreadable row: expected 5 fields, saw 7",
    ]
    assert Pseudonymiser(KEY).subject("ukb", "") not in set(errors["subject_id"])
    # Rows without an id are reported by one shard only, so merged error reports list them once.
    shards = [run(records.iloc[:0], problems.iloc[1:], raw, tmp_path / f"shard{i}", shard=Shard(i, 2)) for i in (0, 1)]
    assert [s.problems for s in shards] == [2, 0]


def test_unlisted_images_are_in_the_summary_pseudonymised_not_failures(brain, tmp_path):
    raw, records, problems = brain
    unlisted = pd.DataFrame({"source_id": ["5000099"], "image": [str(raw / "5000099_20252_2_0/T1/T1.nii.gz")],
                             "cohort": "ukb"})
    summary = run(records.iloc[:1], problems.iloc[:0], raw, tmp_path, unlisted=unlisted)
    pseudonym = Pseudonymiser(KEY).subject("ukb", "5000099")
    assert summary.unlisted == (f"{pseudonym}_20252_2_0/T1/T1.nii.gz",)
    assert summary.ok and "1 images without a metadata row, not processed" in str(summary)
    assert "5000099" not in str(summary)


def test_a_bids_subject_folder_shows_the_pseudonym_once_and_keeps_its_image_name(tmp_path):
    raw = tmp_path / "raw"
    good, bad = (raw / f"sub-{eid}" / "anat" / f"sub-{eid}_T1w.nii.gz" for eid in ("1000001", "1000002"))
    write_nifti(good, head_volume(0))
    bad.parent.mkdir(parents=True)
    bad.touch()
    records = pd.DataFrame({"source_id": ["1000001", "1000002"], "image": [str(good), str(bad)], "sex": "male",
                            "cohort": "ukb"})
    summary = run(records, records.iloc[:0], raw, tmp_path / "out")
    pseudonym = Pseudonymiser(KEY).subject("ukb", "1000002")

    errors = pd.read_csv(summary.errors, dtype=str, keep_default_na=False)
    # was sub-sub-<hash>/anat/sub-sub-<hash>_T1w.nii.gz
    assert errors["file"].tolist() == [f"{pseudonym}/anat/{pseudonym}_T1w.nii.gz"]
    assert "sub-sub-" not in errors["reason"][0] and "1000002" not in errors["reason"][0]
    assert unmask_file(errors["file"][0], pseudonym, "1000002", raw, [str(good), str(bad)]) == bad
    # Image names are hashed from the path as masked before, so outputs of earlier runs are found again.
    kept = Pseudonymiser(KEY).subject("ukb", "1000001")
    image = Pseudonymiser(KEY).image("ukb", "1000001", f"sub-{kept}/anat/sub-{kept}_T1w.nii.gz")
    manifest = read_manifest(summary.manifest)
    assert manifest.loc[manifest["status"] == "ok", "image"].tolist() == [str(tmp_path / "out" / "images" / kept / f"{image}.nii.gz")]


def test_validate_imaged_checks_the_spatial_size_and_names_the_file_only_when_asked():
    from monai.data import MetaTensor

    from mimm_med.data.transforms import ValidateImaged

    image = MetaTensor(np.random.default_rng(0).random((1, 64, 50), dtype=np.float32), meta={"filename_or_obj": "/data/raw/sub-01/scan.png"})
    sized = ValidateImaged("image", spatial_dims=2, spatial_size=(28, 28), name_file=True)
    with pytest.raises(ValueError, match=r"^/data/raw/sub-01/scan.png: expected the spatial size \(28, 28\) .*got \(64, 50\)"):
        sized({"image": image})
    with pytest.raises(ValueError, match=r"^expected the spatial size") as raised:  # preprocessing: no raw path
        ValidateImaged("image", spatial_dims=2, spatial_size=(28, 28))({"image": image})
    assert "sub-01" not in str(raised.value)
    assert ValidateImaged("image", spatial_dims=2, spatial_size=(64, 50))({"image": image})["image"] is image
