"""DICOM series folders: a series ITK would read with a slice missing or unreadable fails, naming the folder."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from monai.data import ITKReader, NibabelReader
from preprocess_fixtures import BRAIN_CONFIG, KEY, head_volume, write_dicom_series

from mimm_med.data.manifest import read_manifest
from mimm_med.data.preprocess import load_pipeline_config, preprocess_records
from mimm_med.data.pseudonym import Pseudonymiser
from mimm_med.data.readers import LoadImageBySuffixd, _gdcm_series, check_dicom_series

SLICES = 6


def series(folder: Path, seed: int = 0) -> Path:
    """Six 8×8 slices 2 mm apart, files ``000.dcm`` to ``005.dcm``."""
    return write_dicom_series(folder, head_volume(seed, size=8)[:SLICES])


def truncate(path: Path, size: int = 300) -> None:
    path.write_bytes(path.read_bytes()[:size])


def load(folder: Path):
    return LoadImageBySuffixd("image", [NibabelReader(), ITKReader()])({"image": str(folder)})["image"]


def test_clean_series_reads_with_its_geometry(tmp_path):
    image = load(series(tmp_path / "T1"))
    assert tuple(image.shape) == (8, 8, SLICES)
    assert image.affine[2, 2] == pytest.approx(2.0)  # slice spacing from the positions, 2 mm apart


def test_truncated_slice_fails_naming_folder_and_the_files_rank(tmp_path):
    folder = series(tmp_path / "T1")
    truncate(folder / "002.dcm")
    message = rf"DICOM series {re.escape(str(folder))}: 1 of {SLICES} files could not be read as slices of the series"
    with pytest.raises(ValueError, match=message + r" \(file 3 of the 6 sorted by name\); re-export the series"):
        load(folder)


def test_slice_missing_from_the_middle_fails_as_non_uniform_spacing(tmp_path):
    folder = series(tmp_path / "T1")
    (folder / "003.dcm").unlink()
    message = rf"DICOM series {re.escape(str(folder))}: slice spacing is not uniform \(4 mm between slices 3 and 4 of 5 in position order, at 4 and 8 mm"
    with pytest.raises(ValueError, match=message):
        load(folder)


@pytest.mark.parametrize("naming", ["uid", "patient"])
def test_slice_file_names_which_may_identify_the_patient_stay_out_of_the_message(tmp_path, naming):
    """storescp names slices by SOP Instance UID, Siemens exports by the patient's name."""
    folder = series(tmp_path / "T1")
    for index, path in enumerate(sorted(folder.iterdir())):
        name = f"1.2.826.0.1.3680043.8.498.{index + 1000}.dcm" if naming == "uid" else f"DOE_JANE.MR.HEAD.{index:04d}.IMA"
        path.rename(folder / name)
    names = sorted(path.name for path in folder.iterdir())
    (folder / names[3]).unlink()
    with pytest.raises(ValueError, match="slice spacing is not uniform") as spacing:
        check_dicom_series(folder)
    truncate(folder / names[1])
    with pytest.raises(ValueError, match=r"1 of 5 files could not .* \(file 2 of the 5 sorted by name\)") as unread:
        check_dicom_series(folder)
    header = pydicom.dcmread(folder / names[4])
    del header.ImagePositionPatient
    (folder / names[1]).unlink()
    header.save_as(folder / names[4])
    with pytest.raises(ValueError, match=r"a slice \(file 3 of the 4 sorted by name\) has no ImagePositionPatient") as unplaced:
        check_dicom_series(folder)
    for error in (spacing, unread, unplaced):
        message = str(error.value)
        assert not any(part in message for part in ("DOE", "JANE", "3680043", ".IMA", ".dcm")), message


def test_position_rounding_and_other_files_are_tolerated(tmp_path):
    folder = series(tmp_path / "T1")
    header = pydicom.dcmread(folder / "003.dcm")
    header.ImagePositionPatient = [0, 0, 6.004]  # a DS rounded off: 0.2 % of the 2 mm gap
    header.save_as(folder / "003.dcm")
    (folder / "notes.txt").write_text("exported from the PACS")
    check_dicom_series(folder)


def test_second_series_in_the_folder_fails_unless_one_is_named(tmp_path):
    folder = series(tmp_path / "T1")
    for path in series(tmp_path / "other", seed=1).iterdir():
        shutil.copy(path, folder / f"other-{path.name}")
    message = rf"DICOM series {re.escape(str(folder))}: the folder holds 2 series; move each"
    with pytest.raises(ValueError, match=message):
        check_dicom_series(folder)
    # Named as ITKReader names it: the series UID with the series date appended.
    first = next(name for name, files in _gdcm_series(folder).items() if not files[0].name.startswith("other-"))
    check_dicom_series(folder, first)
    with pytest.raises(ValueError, match=r"no series 'T1' among its 2; the names are series UIDs") as error:
        check_dicom_series(folder, "T1")
    assert first not in str(error.value)  # before: every series' UID and date, into errors.csv
    image = LoadImageBySuffixd("image", [ITKReader(series_name=first)])({"image": str(folder)})["image"]
    assert tuple(image.shape) == (8, 8, SLICES)


def test_runner_records_the_bad_series_as_a_failed_subject(tmp_path):
    raw = tmp_path / "raw"
    good, bad = series(raw / "1000001" / "dicom"), series(raw / "1000002" / "dicom", seed=1)
    truncate(bad / "004.dcm")
    records = pd.DataFrame(
        {"source_id": ["1000001", "1000002"], "image": [str(good), str(bad)], "sex": ["male", "female"],
         "age_group": ["young", "old"], "cohort": "ukb"}
    )
    problems = pd.DataFrame(columns=["source_id", "image", "reason", "cohort"])
    config = load_pipeline_config(BRAIN_CONFIG, {"spatial_size": [8, 8, 8]})
    summary = preprocess_records(records, problems, config, raw, tmp_path / "out", Pseudonymiser(KEY), progress=False)
    assert (summary.done, summary.failed) == (1, 1)
    manifest = read_manifest(summary.manifest).set_index("subject_id")["status"]
    pseudonymiser = Pseudonymiser(KEY)
    assert manifest[pseudonymiser.subject("ukb", "1000001")] == "ok"
    assert manifest[pseudonymiser.subject("ukb", "1000002")] == "failed"
    (reason,) = pd.read_csv(summary.errors)["reason"]
    assert reason.startswith("ValueError: DICOM series ")
    assert "1 of 6 files could not be read as slices of the series (file 5 of the 6 sorted by name)" in reason
    assert "1000002" not in reason  # the folder is shown with the subject's pseudonym
