"""Stand-in cohorts: real layouts read back by the real readers, effects in the right direction, determinism."""

from __future__ import annotations

import dataclasses
import datetime

import gdcm
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from preprocess_fixtures import identifying_values
from pydicom.datadict import keyword_for_tag
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from mimm_med.data.standins import COHORT_KINDS, EFFECTS, brain, chest_xray, generate_cohort

BRAIN_N = 4
XRAY_N = 8
NO_EFFECTS = dict.fromkeys(chest_xray.CXR_EFFECTS, 0.0)


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict:
    """One small cohort of every kind, generated once for the module."""
    root = tmp_path_factory.mktemp("standins")
    return {
        kind: generate_cohort(
            kind,
            BRAIN_N if kind in ("ukb", "nako") else XRAY_N,
            root / kind,
            seed=3,
            resolution_mm=4.0 if kind in ("ukb", "nako") else None,
            progress=False,
        )
        for kind in COHORT_KINDS
    }


def test_unknown_kind_and_effect_are_refused_with_the_valid_names(tmp_path):
    with pytest.raises(ValueError, match="chexpert_plus"):
        generate_cohort("mimic", 2, tmp_path)
    with pytest.raises(ValueError, match=r"unknown effect.*'blur'.*\['age', 'sex', 'scanner'\]"):
        generate_cohort("ukb", 2, tmp_path, effects={"blur": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        generate_cohort("chexpert", 2, tmp_path, effects={"sex": -1.0})
    assert set(EFFECTS) == set(COHORT_KINDS)
    assert EFFECTS["chexpert"] == ("effusion", "sex", "age", "devices")


# Brain ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, columns, sexes, ages, orientation",
    [
        ("ukb", ["eid", "31-0.0", "21003-2.0", "54-2.0", "53-2.0"], {0, 1}, (45, 82), ("L", "A", "S")),
        (
            "nako",
            ["ID", "basis_sex", "basis_age", "basis_studyc", "mri_scanner", "mri_date"],
            {1, 2},
            (20, 75),
            ("A", "S", "L"),
        ),
    ],
)
def test_brain_layout_reads_back_with_nibabel(cohorts, kind, columns, sexes, ages, orientation):
    out = cohorts[kind]
    layout = brain.LAYOUTS[kind]
    table = pd.read_csv(out / layout.table, dtype={columns[0]: str})
    assert list(table.columns) == columns
    assert len(table) == BRAIN_N and table[columns[0]].is_unique
    assert set(table[columns[1]]) <= sexes
    assert table[columns[2]].between(*ages).all()
    template = brain.load_template(2.0)
    for subject_id in table[columns[0]]:
        image = nib.load(out / layout.image_path.format(id=subject_id))
        data = np.asarray(image.dataobj)
        assert data.ndim == 3 and image.get_data_dtype() == np.int16
        assert nib.aff2axcodes(image.affine) == orientation
        assert np.allclose(sorted(image.header.get_zooms()), 4.0, rtol=0.12)
        assert int(image.header["sform_code"]) == 1
        # The brain sits where the template's brain is in world (scanner ~ MNI) coordinates.
        voxels = np.argwhere(data > 0)
        centre = nib.affines.apply_affine(image.affine, voxels.mean(0))
        assert np.linalg.norm(centre - template.centre_mm) < 15.0


def test_cohorts_differ_in_storage_and_scanner_unless_scanner_effect_is_zero(tmp_path):
    zooms = {}
    for scanner in (0.0, 1.0):
        for kind in ("ukb", "nako"):
            out = generate_cohort(
                kind, 1, tmp_path / f"{kind}{scanner}", effects={"scanner": scanner}, resolution_mm=4.0, progress=False
            )
            image = nib.as_closest_canonical(nib.load(next(out.rglob("*.nii.gz"))))
            zooms[kind, scanner] = np.array(image.header.get_zooms())
    assert np.allclose(zooms["ukb", 0.0], zooms["nako", 0.0])
    assert zooms["nako", 1.0][0] > zooms["ukb", 1.0][0] * 1.05  # NAKO's thicker sagittal slices


def _subject(age: int, sex: str) -> brain.BrainSubject:
    return brain.BrainSubject("1000001", sex, age, "11025", datetime.date(2016, 1, 1))


def _render(age: int, sex: str, effects: dict) -> np.ndarray:
    """A 3 mm volume rendered with the neutral protocol and a fixed subject stream."""
    layout = brain.LAYOUTS["ukb"]
    protocol = brain._NEUTRAL.scaled({"voxel_mm": 3.0})
    image = brain.render_subject(
        _subject(age, sex), layout, brain.load_template(1.5), effects, protocol, np.random.default_rng(7)
    )
    return np.asarray(image.dataobj) / layout.white_matter_value


def _csf_fraction(volume: np.ndarray) -> float:
    brain_voxels = volume > 0.05
    return float(((volume < 0.55) & brain_voxels).sum() / brain_voxels.sum())  # CSF 0.34, grey matter 0.75


def test_age_enlarges_csf_and_sex_scales_the_head():
    effects = {"age": 1.0, "sex": 1.0, "scanner": 0.0}
    young, old = _render(25, "female", effects), _render(80, "female", effects)
    assert _csf_fraction(old) > _csf_fraction(young) + 0.02
    no_age = {**effects, "age": 0.0}
    assert np.array_equal(_render(25, "female", no_age), _render(80, "female", no_age))
    male = _render(25, "male", {**effects, "sex": 2.0})
    female = _render(25, "female", {**effects, "sex": 2.0})
    assert (male > 0.05).sum() > 1.1 * (female > 0.05).sum()  # exp(0.08) linear -> ~27 % volume


def test_generation_is_deterministic_per_seed(tmp_path):
    def volumes(out):
        return [np.asarray(nib.load(p).dataobj) for p in sorted(out.rglob("*.nii.gz"))]

    first, again, other = (
        generate_cohort("nako", 2, tmp_path / name, seed=seed, resolution_mm=4.0, progress=False)
        for name, seed in (("a", 5), ("b", 5), ("c", 6))
    )
    assert all(np.array_equal(x, y) for x, y in zip(volumes(first), volumes(again)))
    assert (first / "nako_metadata.csv").read_text() == (again / "nako_metadata.csv").read_text()
    assert (first / "nako_metadata.csv").read_text() != (other / "nako_metadata.csv").read_text()
    xray = [generate_cohort("chexpert", 3, tmp_path / f"x{i}", seed=1, progress=False) for i in range(2)]
    files = sorted(p.relative_to(xray[0]) for p in xray[0].rglob("*.*"))
    assert files == sorted(p.relative_to(xray[1]) for p in xray[1].rglob("*.*"))
    assert all((xray[0] / f).read_bytes() == (xray[1] / f).read_bytes() for f in files)


# Chest X-ray ---------------------------------------------------------------------------------------


def test_chexpert_layout_tables_and_pictures(cohorts):
    out = cohorts["chexpert"]
    train, valid = (pd.read_csv(out / f"{split}.csv") for split in ("train", "valid"))
    for table in (train, valid):
        assert list(table.columns) == list(chest_xray.CHEXPERT_COLUMNS)
        assert table["Path"].str.startswith("CheXpert-v1.0-small/").all()
        assert set(table["Sex"]) <= {"Male", "Female", "Unknown"}
        assert set(table["Frontal/Lateral"]) <= {"Frontal", "Lateral"}
        assert table.loc[table["Frontal/Lateral"] == "Lateral", "AP/PA"].isna().all()
        assert set(table.loc[table["Frontal/Lateral"] == "Frontal", "AP/PA"]) <= {"AP", "PA"}
    assert set(train["Frontal/Lateral"]) == {"Frontal", "Lateral"}
    reported = train[list(chest_xray.FINDINGS)].to_numpy().ravel()
    assert set(reported[~np.isnan(reported)]) == {1.0, 0.0, -1.0} and np.isnan(reported).any()  # blanks too
    assert set(valid[list(chest_xray.FINDINGS)].to_numpy().ravel()) <= {0.0, 1.0}  # radiologist labels
    modes = {}
    for path in pd.concat([train, valid])["Path"]:
        picture = Image.open(out / path.removeprefix("CheXpert-v1.0-small/"))
        modes.setdefault((picture.format, picture.mode), []).append(np.asarray(picture))
        assert picture.width == 320 and abs(picture.height - 390) <= 16
    assert set(modes) == {("JPEG", "L"), ("PNG", "L"), ("PNG", "I;16")}
    assert max(a.max() for a in modes["PNG", "I;16"]) > 255  # really 16-bit


def test_label_rates_are_realistic():
    studies = chest_xray.draw_studies(1500, np.random.default_rng(0))
    effusion = pd.Series([s.labels["Pleural Effusion"] for s in studies if s.split == "train"])
    shares = {
        "positive": (effusion == 1.0).mean(),
        "uncertain": (effusion == -1.0).mean(),
        "negative": (effusion == 0.0).mean(),
        "blank": effusion.isna().mean(),
    }
    assert 0.25 < shares["positive"] < 0.45 and 0.03 < shares["uncertain"] < 0.15
    assert 0.1 < shares["negative"] < 0.3 and 0.3 < shares["blank"] < 0.6
    sexes = pd.Series([s.recorded_sex for s in studies])
    assert 0.0 < (sexes == "Unknown").mean() < 0.03
    assert abs((sexes == "Male").mean() - (sexes == "Female").mean()) < 0.1


def _study(**changes) -> chest_xray.ChestStudy:
    base = chest_xray.draw_studies(1, np.random.default_rng(0))[0]
    return dataclasses.replace(base, **changes)


def _frontal(study, effects=None) -> np.ndarray:
    effects = effects or dict.fromkeys(chest_xray.CXR_EFFECTS, 1.0)
    return chest_xray.render_frontal(study, effects, (390, 320), np.random.default_rng(11))


def test_effusion_brightens_the_lung_bases_and_devices_add_metal():
    clear = _frontal(_study(effusion=(False, False), devices=()))
    fluid = _frontal(_study(effusion=(True, True), devices=()))
    bases = (slice(230, 290), np.r_[40:120, 200:280])  # lower lung zones, both sides
    apices = (slice(90, 150), np.r_[40:120, 200:280])
    assert fluid[bases].mean() > clear[bases].mean() + 0.1
    assert abs(fluid[apices].mean() - clear[apices].mean()) < 0.01
    hidden = {**dict.fromkeys(chest_xray.CXR_EFFECTS, 1.0), "effusion": 0.0}
    assert np.array_equal(
        _frontal(_study(effusion=(True, True), devices=()), hidden),
        _frontal(_study(effusion=(False, False), devices=()), hidden),
    )
    devices = _frontal(_study(effusion=(False, False), devices=("pacemaker", "central_line")))
    assert (devices > 0.97).sum() > (clear > 0.97).sum() + 100


def test_sex_and_age_effects_change_the_anatomy():
    def rng() -> np.random.Generator:
        return np.random.default_rng(0)

    full = dict.fromkeys(chest_xray.CXR_EFFECTS, 1.0)
    old, young = (chest_xray._anatomy_parameters(_study(age=a), full, rng()) for a in (85, 25))
    assert old["bone"] < 0.8 * young["bone"] and old["kyphosis"] > young["kyphosis"]
    female, male = (chest_xray._anatomy_parameters(_study(sex=s), full, rng()) for s in ("female", "male"))
    assert female["breast"] > 0 and male["breast"] == 0 and male["habitus"] > female["habitus"]
    neutral = [
        chest_xray._anatomy_parameters(_study(sex=s, age=a), NO_EFFECTS, rng())
        for s, a in (("female", 85), ("male", 25))
    ]
    assert neutral[0] == neutral[1]


def _display(ds: pydicom.Dataset) -> np.ndarray:
    """What a viewer shows: modality and VOI LUT, MONOCHROME1 inverted; bright = dense."""
    shown = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(float)
    return shown.max() + shown.min() - shown if ds.PhotometricInterpretation == "MONOCHROME1" else shown


def test_dicoms_read_with_pydicom_and_simpleitk_and_monochrome1_is_inverted(cohorts):
    out = cohorts["chexpert_plus"]
    table = pd.read_csv(out / "df_chexpert_plus.csv")
    assert list(table.columns) == list(chest_xray.CHEXPERT_PLUS_COLUMNS)
    seen = set()
    for relative, view in zip(table["path_to_dcm"], table["frontal_lateral"]):
        ds = pydicom.dcmread(out / relative)
        seen.add((ds.Modality, ds.PhotometricInterpretation, int(ds.BitsStored)))
        stored = ds.pixel_array
        assert stored.max() <= 2 ** int(ds.BitsStored) - 1
        itk = sitk.GetArrayFromImage(sitk.ReadImage(str(out / relative)))[0]
        assert itk.shape == stored.shape == (ds.Rows, ds.Columns)
        assert ds.PixelSpacing == ds.ImagerPixelSpacing == [1.1, 1.1]  # square, whatever the number of rows
        # GDCM shows MONOCHROME1 the way a viewer does: inverted within the stored range.
        raw = (2 ** int(ds.BitsStored) - 1 - stored) if ds.PhotometricInterpretation == "MONOCHROME1" else stored
        assert np.allclose(itk, raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
        if view == "Frontal":
            lungs, mediastinum = (slice(130, 220), np.r_[50:110, 210:270]), (slice(130, 220), slice(150, 170))
            assert _display(ds)[lungs].mean() < _display(ds)[mediastinum].mean()  # dark lungs on screen
            stored_lungs_brighter = stored[lungs].mean() > stored[mediastinum].mean()
            assert stored_lungs_brighter == (ds.PhotometricInterpretation == "MONOCHROME1")
    assert {m for m, _, _ in seen} == {"CR", "DX"}
    assert {p for _, p, _ in seen} == {"MONOCHROME1", "MONOCHROME2"}
    assert {b for _, _, b in seen} == {12, 16}


def _basic_profile() -> set[str]:
    """Keywords of GDCM's PS3.15 Basic Application Level Confidentiality Profile attributes."""
    tags = gdcm.Anonymizer.GetBasicApplicationLevelConfidentialityProfileAttributes()
    return {keyword_for_tag(tag.GetGroup() << 16 | tag.GetElement()) for tag in tags} - {""}


def test_planted_identities_live_only_in_dicom_headers(cohorts):
    out = cohorts["chexpert_plus"]
    table = pd.read_csv(out / "df_chexpert_plus.csv")
    headers = [pydicom.dcmread(out / path, stop_before_pixels=True) for path in table["path_to_dcm"]]
    # Sex and age are in the profile too, but the table releases them: the labels.
    searched = {*chest_xray.IDENTIFYING_ATTRIBUTES, "PatientSex", "PatientAge"}
    for ds in headers:
        assert not [keyword for keyword in chest_xray.IDENTIFYING_ATTRIBUTES if not str(ds.get(keyword, ""))]
        assert {element.keyword for element in ds} & _basic_profile() <= searched  # none that no test searches
        label = ds.private_block(chest_xray.PRIVATE_GROUP, chest_xray.PRIVATE_CREATOR)[0x10].value
        assert label == f"{ds.PatientName} {ds.PatientID} {ds.AccessionNumber}"  # as a plate's barcode label
        assert str(ds.PatientName).split("^")[0] in chest_xray.PLANTED_SURNAMES
        assert ds.PatientID.startswith("MRN") and ds.OtherPatientIDs.startswith("INS-")
        assert ds.InstitutionName in chest_xray.PLANTED_INSTITUTIONS and ds.AccessionNumber.startswith("ACC")
        assert len(ds.PatientBirthDate) == 8
        born = datetime.datetime.strptime(ds.PatientBirthDate, "%Y%m%d")
        assert int((datetime.datetime.strptime(ds.StudyDate, "%Y%m%d") - born).days / 365.25) == int(ds.PatientAge[:3])
        assert ds.StudyTime < ds.AcquisitionTime < ds.ContentTime  # exposed after the study began, processed after
    by_patient = {(patient, ds.PatientID, ds.PatientName) for patient, ds in zip(table["deid_patient_id"], headers)}
    assert len(by_patient) == table["deid_patient_id"].nunique()  # one identity per patient, one patient per MRN
    assert len({patient_id for _, patient_id, _ in by_patient}) == len(by_patient)
    text = (out / "df_chexpert_plus.csv").read_text() + "".join(str(p) for p in out.rglob("*"))
    planted = set().union(*map(identifying_values, headers))
    assert not [value for value in planted if value in text]
