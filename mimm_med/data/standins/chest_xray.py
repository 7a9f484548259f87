"""Chest X-ray stand-in cohorts in the CheXpert (JPG/PNG) and CheXpert Plus (DICOM) layouts.

Every image is a parametric phantom: soft tissue, lungs, heart, mediastinum, diaphragm, spine,
ribs and clavicles, drawn as attenuation and shown bright = dense. The primary label is pleural
effusion (fluid in the lung base with a meniscus that blunts the costophrenic angle); the spurious
factors the caller can make visible are

- ``sex``: body habitus (males broader) and breast shadows over the lower lungs;
- ``age``: bone density (fainter ribs and clavicles) and kyphosis (raised clavicles, unfolded aorta);
- ``devices``: support devices drawn in (tubes, central lines, pacemakers, ECG leads).

Effect size 0 removes an effect from the images (labels are still drawn), 1 is the default.
Labels, sex, age and devices are drawn independently, so that a downstream confounding sampler can
select any correlation between them. Of the other CheXpert findings only cardiomegaly is drawn (a
larger heart); the rest are labels at realistic rates.
"""

from __future__ import annotations

import datetime
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from math import comb
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage
from tqdm.auto import tqdm

from ..writers import atomic_output

CXR_EFFECTS: tuple[str, ...] = ("effusion", "sex", "age", "devices")
FINDINGS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
CHEXPERT_COLUMNS: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + FINDINGS
CHEXPERT_PLUS_COLUMNS: tuple[str, ...] = (
    "path_to_image",
    "path_to_dcm",
    "frontal_lateral",
    "ap_pa",
    "sex",
    "age",
    "deid_patient_id",
    "patient_report_date_order",
) + FINDINGS
CHEXPERT_PREFIX = "CheXpert-v1.0-small/"
IMAGE_SIZE: tuple[int, int] = (390, 320)  # rows, columns: CheXpert-small's typical frontal
FIELD_MM: tuple[float, float] = (429.0, 352.0)  # film size the phantom spans: ~1.1 mm pixels at IMAGE_SIZE

# Identities planted in the DICOM headers, and nowhere else, so that de-identification can be
# tested by searching outputs for them: patients', staff's and sites' names, and the patients'
# addresses, ids, dates and free-text notes, as PACS exports carry them.
PLANTED_SURNAMES: tuple[str, ...] = (
    "Quillfeather", "Vonnegrath", "Blennerhassett", "Featherstonhaugh", "Grimsditch", "Wolstenholme",
    "Thistlewood", "Drabblecombe", "Quarrington", "Hollowmere", "Marchbanks", "Zabrowski",
)  # fmt: skip
PLANTED_GIVEN_NAMES: tuple[str, ...] = (
    "Aurelio", "Brunhilde", "Cosimo", "Dagny", "Evander", "Florimel", "Gideon", "Hesper", "Ottilie", "Peregrine",
)  # fmt: skip
PLANTED_INSTITUTIONS: dict[str, str] = {  # name -> address
    "Saint Quimby Memorial Hospital": "1 Quimby Close, Lower Tarrow TR9 4QX",
    "Fernhollow Regional Medical Centre": "220 Fernhollow Parkway, Esselby ES4 1RW",
    "Old Wexley General Infirmary": "Infirmary Lane, Old Wexley WX2 8JD",
}
_STREETS: tuple[str, ...] = ("Brackenridge Row", "Candlewick Lane", "Orrery Gardens", "Tumblestone Road")
_TOWNS: tuple[str, ...] = ("Nethercombe", "Pennyfold", "Wychelm Magna", "Sallowby")
_RANKS: tuple[str, ...] = ("Squadron Leader", "Lieutenant Commander", "Warrant Officer Class 2", "Brigadier")
_OCCUPATIONS: tuple[str, ...] = ("Lamplighter", "Falconer", "Cartographer", "Glassblower", "Wheelwright")
_DEPARTMENTS: tuple[str, ...] = ("Thistle Ward Imaging", "Emergency Radiology East", "Portable Imaging Unit")
#: Keywords of the PS3.15 Basic Application Level Confidentiality Profile attributes that every
#: stand-in DICOM carries filled in (PatientSex and PatientAge too, but the table releases those).
IDENTIFYING_ATTRIBUTES: tuple[str, ...] = (
    # patient
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate",
    "PatientBirthTime", "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers",
    "MilitaryRank", "Occupation", "MedicalRecordLocator", "AdditionalPatientHistory", "PatientComments",
    # study: when, where, by whom
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
    "ReferringPhysicianName", "RequestingPhysician", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
    "PerformingPhysicianName", "OperatorsName", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber",
    # series and image
    "SeriesInstanceUID", "SOPInstanceUID", "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime",
    "AcquisitionDateTime", "ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime",
    "SeriesDescription", "ProtocolName", "ImageComments",
)  # fmt: skip
#: Private block of the stand-in DICOMs, as CR readers write one: the plate's barcode label holds
#: the patient's name and id, which a reader that copies private elements would carry along.
PRIVATE_CREATOR = "AGFA"
PRIVATE_GROUP = 0x0019

# Rates of (positive, uncertain, negative) mentions of the findings that are not drawn; the rest
# is blank. Roughly CheXpert's training-set rates.
_OTHER_FINDING_RATES: dict[str, tuple[float, float, float]] = {
    "Enlarged Cardiomediastinum": (0.05, 0.05, 0.05),
    "Cardiomegaly": (0.12, 0.03, 0.05),
    "Lung Opacity": (0.45, 0.02, 0.03),
    "Lung Lesion": (0.04, 0.01, 0.01),
    "Edema": (0.23, 0.06, 0.08),
    "Consolidation": (0.07, 0.12, 0.12),
    "Pneumonia": (0.03, 0.08, 0.01),
    "Atelectasis": (0.15, 0.15, 0.01),
    "Pneumothorax": (0.09, 0.01, 0.25),
    "Pleural Other": (0.015, 0.01, 0.005),
    "Fracture": (0.04, 0.003, 0.01),
}
_EFFUSION_PREVALENCE = 0.4
_DEVICE_PREVALENCE = 0.5
_LATERAL_EVERY = 4  # every 4th study also has a lateral view
_VALID_FRACTION = 0.1
_DEVICES: tuple[str, ...] = ("tube", "nasogastric", "central_line", "pacemaker", "ecg_leads")
_EDGE = 0.01  # width of the anti-aliased edges of anatomy, in normalised units (~2 pixels)


@dataclass(frozen=True)
class ChestStudy:
    """Ground truth and reported labels of one chest X-ray study.

    ``recorded_sex`` is what the table says (``"Male"``, ``"Female"`` or ``"Unknown"``), ``sex``
    the anatomy drawn. ``effusion`` flags fluid on the (patient's right, left) side. ``labels``
    maps every CheXpert finding to 1.0, 0.0, -1.0 or NaN (blank).
    """

    split: str
    patient: str
    study: int
    recorded_sex: str
    sex: str
    age: int
    ap_pa: str
    lateral: bool
    effusion: tuple[bool, bool]
    devices: tuple[str, ...]
    cardiomegaly: bool
    labels: Mapping[str, float]


@dataclass(frozen=True)
class PatientIdentity:
    """Identifying DICOM attributes of one patient: the values de-identification must remove.

    ``header`` maps the patient's attributes (DICOM keywords) to their values; the rest places the
    patient's studies in time and in a hospital.
    """

    institution: str
    first_study: datetime.date
    header: Mapping[str, str]

    def study_date(self, study: int) -> datetime.date:
        """Date of the patient's ``study``-th study: a year after the previous one, so ages match."""
        return self.first_study + datetime.timedelta(days=365 * (study - 1) + 7 * study)


@dataclass(frozen=True)
class Visit:
    """Identifying DICOM attributes of one study (``header``: DICOM keyword -> value), which began at ``start``."""

    start: datetime.datetime
    header: Mapping[str, str]


def _mention(rng: np.random.Generator, rates: tuple[float, float, float]) -> float:
    """A CheXpert label value drawn with (positive, uncertain, negative) ``rates``; blank otherwise."""
    return float(rng.choice([1.0, -1.0, 0.0, np.nan], p=[*rates, 1.0 - sum(rates)]))


def _study_labels(rng: np.random.Generator, effusion: bool, devices: bool, valid: bool) -> dict[str, float]:
    """Labels of one study: reported effusion and devices follow the truth, with report noise.

    Training labels come from report text (uncertain and blank mentions); validation labels are
    radiologist reads, 0 or 1 only, as in CheXpert.
    """
    labels = {name: _mention(rng, rates) for name, rates in _OTHER_FINDING_RATES.items()}
    labels["Pleural Effusion"] = _mention(rng, (0.85, 0.15, 0.0) if effusion else (0.0, 0.05, 0.30))
    labels["Support Devices"] = _mention(rng, (0.9, 0.05, 0.0) if devices else (0.0, 0.0, 0.15))
    if valid:
        labels = {name: float(value == 1.0 or (value == -1.0 and rng.random() < 0.5)) for name, value in labels.items()}
        labels["Pleural Effusion"], labels["Support Devices"] = float(effusion), float(devices)
    pathology = [v for name, v in labels.items() if name != "Support Devices"]
    no_finding = not any(v in (1.0, -1.0) for v in pathology)
    labels["No Finding"] = 1.0 if no_finding else (0.0 if valid else np.nan)
    return {name: labels[name] for name in FINDINGS}


def draw_studies(n: int, rng: np.random.Generator) -> list[ChestStudy]:
    """Draw the studies of ``n`` patients, about a tenth of them in the validation split.

    Sex, age, effusion and devices are independent; a patient has 1 to 3 studies, each with a
    frontal view, every 4th also with a lateral one.
    """
    n_valid = int(np.ceil(n * _VALID_FRACTION)) if n > 1 else 0
    studies = []
    for index in range(n):
        split = "valid" if index >= n - n_valid else "train"
        sex = str(rng.choice(["male", "female"]))
        recorded = "Unknown" if rng.random() < 0.01 else sex.capitalize()
        age = int(np.clip(rng.normal(60, 17), 18, 88))
        for study in range(1, 2 + int(rng.random() < 0.3) + int(rng.random() < 0.1)):
            effusion = rng.random() < _EFFUSION_PREVALENCE
            has_devices = rng.random() < _DEVICE_PREVALENCE
            labels = _study_labels(rng, effusion, has_devices, split == "valid")
            side = rng.choice(3, p=[0.4, 0.3, 0.3])  # right, left, both
            studies.append(
                ChestStudy(
                    split=split,
                    patient=f"patient{index + 1:05d}",
                    study=study,
                    recorded_sex=recorded,
                    sex=sex,
                    age=age + study - 1,
                    ap_pa=str(rng.choice(["AP", "PA"], p=[0.7, 0.3])),
                    # A fixed share, so that even a tiny cohort has lateral views to filter out.
                    lateral=len(studies) % _LATERAL_EVERY == 1,
                    effusion=(effusion and side != 1, effusion and side != 0),
                    devices=tuple(map(str, rng.choice(_DEVICES, rng.integers(1, 4), replace=False)))
                    if has_devices
                    else (),
                    cardiomegaly=labels["Cardiomegaly"] == 1.0,
                    labels=labels,
                )
            )
    return studies


def _step(x: np.ndarray, width: float = _EDGE) -> np.ndarray:
    """0 for x < -width/2, 1 for x > width/2, a linear edge in between (anti-aliased shapes)."""
    return np.clip(x / width + 0.5, 0.0, 1.0)


def _ellipsoid(u: np.ndarray, v: np.ndarray, centre: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    """Projected thickness of an ellipsoid: sqrt(1 - r²) inside, 0 outside."""
    r2 = ((u - centre[0]) / radii[0]) ** 2 + ((v - centre[1]) / radii[1]) ** 2
    return np.sqrt(np.clip(1.0 - r2, 0.0, None))


def _band(distance: np.ndarray, half_width: float) -> np.ndarray:
    """A line of ``half_width`` around ``distance`` = 0 with anti-aliased edges."""
    return _step(half_width - np.abs(distance), _EDGE / 2)


def _periodic_band(phase: np.ndarray, duty: float) -> np.ndarray:
    """Parallel lines: 1 where the fractional part of ``phase`` is below ``duty``, soft edges."""
    fraction = phase - np.floor(phase)
    return np.clip(np.minimum(fraction, duty - fraction) * 12.0 + 0.5, 0.0, 1.0)


def _coordinates(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image coordinates: u in [-1, 1] left to right, v in [0, 1] top to bottom."""
    rows, cols = shape
    v = ((np.arange(rows, dtype=np.float32) + 0.5) / rows)[:, None]
    u = ((np.arange(cols, dtype=np.float32) + 0.5 - cols / 2) / (cols / 2))[None, :]
    return np.broadcast_to(u, shape), np.broadcast_to(v, shape)


def _curve_mask(shape: tuple[int, int], control: np.ndarray, width_px: float) -> np.ndarray:
    """A Bézier curve through ``control`` points (u, v) drawn ``width_px`` wide, values in [0, 1]."""
    rows, cols = shape
    degree = len(control) - 1
    length_px = np.sum(np.hypot(np.diff(control[:, 0]) * cols / 2, np.diff(control[:, 1]) * rows)) + 1
    t = np.linspace(0.0, 1.0, int(4 * length_px))[:, None]
    points = sum(comb(degree, i) * (1 - t) ** (degree - i) * t**i * control[i] for i in range(degree + 1))
    c = np.rint((points[:, 0] + 1.0) * cols / 2 - 0.5).astype(int)
    r = np.rint(points[:, 1] * rows - 0.5).astype(int)
    inside = (c >= 0) & (c < cols) & (r >= 0) & (r < rows)
    mask = np.zeros(shape, dtype=np.float32)
    mask[r[inside], c[inside]] = 1.0
    sigma = width_px / 2.5
    # A blurred 1-pixel line peaks at 1 / (sqrt(2 pi) sigma): rescale so that its core is 1.
    return np.clip(ndimage.gaussian_filter(mask, sigma) * np.sqrt(2 * np.pi) * sigma, 0.0, 1.0)


def _jitter(rng: np.random.Generator, points: list[tuple[float, float]]) -> np.ndarray:
    """Control points moved by a few pixels: no two devices lie exactly alike."""
    return np.array(points, dtype=float) + rng.normal(0.0, 0.01, (len(points), 2))


def _frontal_devices(
    shape: tuple[int, int], u: np.ndarray, v: np.ndarray, devices: tuple[str, ...], rng: np.random.Generator
) -> np.ndarray:
    """Radio-opaque density of the support ``devices`` in a frontal view (u < 0 is the patient's right)."""
    metal = np.zeros(shape, dtype=np.float32)
    for device in devices:
        if device == "tube":  # endotracheal tube ending above the carina
            metal += _curve_mask(shape, _jitter(rng, [(0.0, 0.0), (0.01, 0.12), (0.0, 0.25)]), 2.0)
        elif device == "nasogastric":  # down the oesophagus, below the left hemidiaphragm
            metal += _curve_mask(shape, _jitter(rng, [(0.02, 0.0), (0.04, 0.5), (0.0, 0.95), (0.3, 0.85)]), 1.5)
        elif device == "central_line":  # right subclavian into the superior vena cava
            metal += _curve_mask(shape, _jitter(rng, [(-0.55, 0.14), (-0.2, 0.13), (-0.06, 0.22), (-0.06, 0.38)]), 1.5)
        elif device == "pacemaker":  # left pectoral generator, lead into the right ventricle
            x, y = _jitter(rng, [(0.5, 0.17)])[0]
            metal += 1.5 * _step(1.0 - ((u - x) / 0.11) ** 4 - ((v - y) / 0.04) ** 4, 0.2)
            metal += _curve_mask(
                shape, _jitter(rng, [(x, y), (0.2, 0.12), (-0.05, 0.3), (-0.02, 0.5), (0.12, 0.62)]), 1.5
            )
        elif device == "ecg_leads":  # electrodes on the chest wall with their wires
            for x, y in _jitter(rng, [(-0.6, 0.2), (0.6, 0.2), (0.55, 0.75)]):
                metal += 0.8 * _band(np.hypot((u - x) * 0.6, v - y), 0.012)
                metal += 0.5 * _curve_mask(shape, _jitter(rng, [(x, y), (x * 1.3, y + 0.2), (x * 1.6, 1.0)]), 1.2)
    return metal


def _anatomy_parameters(study: ChestStudy, effects: Mapping[str, float], rng: np.random.Generator) -> dict[str, float]:
    """Per-image anatomy: habitus, bone density, kyphosis, breast shadow and heart size, with individual variation."""
    sex_sign = 1.0 if study.sex == "male" else -1.0
    years = np.clip((study.age - 20) / 70.0, 0.0, 1.0)
    return {
        "habitus": float(np.exp(effects["sex"] * 0.04 * sex_sign + rng.normal(0.0, 0.03))),
        "bone": float(max(1.0 - effects["age"] * 0.5 * years, 0.15) * rng.uniform(0.9, 1.1)),
        "kyphosis": float(effects["age"] * years * rng.uniform(0.7, 1.3)),
        "breast": float(effects["sex"] * (study.sex == "female") * rng.uniform(0.6, 1.2)),
        "heart": float(rng.uniform(0.9, 1.1) * (1.25 if study.cardiomegaly else 1.0)),
        "effusion_height": float(rng.uniform(0.04, 0.2)),
    }


def _lung_markings(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Vessel-like texture: smoothed noise with zero mean and unit standard deviation."""
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0)
    return texture / (texture.std() + 1e-6)


def render_frontal(
    study: ChestStudy, effects: Mapping[str, float], shape: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """Frontal (PA or AP) phantom of ``study``: float32 ``shape`` image in [0, 1], bright = dense.

    Image left is the patient's right, as on a radiograph. Coordinates are normalised: u across
    (-1 to 1), v down (0 to 1); ``a`` is the distance from the midline in units of body width.
    """
    # One stream per part, so that drawing a device or not leaves the rest of the image as it is.
    anatomy_rng, markings_rng, devices_rng, exposure_rng = rng.spawn(4)
    p = _anatomy_parameters(study, effects, anatomy_rng)
    u, v = _coordinates(shape)
    a = np.abs(u) / p["habitus"]
    right = u < 0

    shoulders = np.clip((v - 0.04) / 0.13, 0.0, 1.0)
    width = 0.23 + 0.71 * shoulders**2 * (3 - 2 * shoulders) - 0.05 * np.clip(v - 0.3, 0.0, None)
    density = np.sqrt(np.clip(1.0 - (a / width) ** 2, 0.0, None))

    apex = 0.1 + anatomy_rng.normal(0.0, 0.01) - 0.02 * p["kyphosis"]
    angle = 0.76 + anatomy_rng.normal(0.0, 0.015) - 0.03 * right  # costophrenic angles; the right dome is higher
    wall = 0.8 + anatomy_rng.normal(0.0, 0.015)  # lateral chest wall
    centre, radius = 0.46, wall - 0.46
    upper = apex + 0.3
    r2 = ((a - centre) / radius) ** 2 + np.where(v < upper, ((v - upper) / 0.3) ** 2, 0.0)
    across = np.clip((a - 0.1) / (wall - 0.1), 0.0, 1.0)
    dome = angle - 0.09 * np.sin(np.pi * across**0.7)  # meets the chest wall at a sharp angle
    lung = _step(1.0 - r2, 0.05) * _step(a - 0.11) * _step(dome - v)

    heart_radii = (0.27 * p["heart"] * (1.12 if study.ap_pa == "AP" else 1.0), 0.14 * p["heart"])
    tilt = np.deg2rad(-20.0)
    hu, hv = u / p["habitus"] - 0.06, v - 0.61
    heart = _step(
        1.0
        - ((hu * np.cos(tilt) - hv * np.sin(tilt)) / heart_radii[0]) ** 2
        - ((hu * np.sin(tilt) + hv * np.cos(tilt)) / heart_radii[1]) ** 2,
        0.1,
    )
    knob = _step(1.0 - ((u - 0.1) ** 2 + ((v - 0.31) * 1.2) ** 2) / (0.05 * (1 + 0.5 * p["kyphosis"])) ** 2, 0.2)
    air = lung * (1.0 - heart) * (1.0 - knob) * (0.8 + 0.2 * np.clip((v - apex) / (angle - apex), 0.0, 1.0))
    for side, present in zip((right, ~right), study.effusion):
        if present:
            level = angle - p["effusion_height"] - 0.06 * across**2  # meniscus: higher laterally
            fluid = np.clip(effects["effusion"] * lung * side * _step(v - level, 0.04), 0.0, 1.0)
            air = air * (1.0 - fluid)
    hila = np.clip(1.0 - np.abs(a - 0.2) / 0.6, 0.0, 1.0)
    density = density - 0.85 * air + 0.05 * lung * hila * _lung_markings(shape, markings_rng)

    bone = p["bone"]
    density -= 0.3 * _band(u, 0.025) * _step(0.32 - v)  # trachea
    density += 0.25 * bone * _band(u, 0.05) * (0.7 + 0.3 * np.cos(np.pi * v / 0.045) ** 8)  # spine
    thorax = _step(wall + 0.07 - a) * _step(a - 0.06) * _step(angle + 0.03 - v) * _step(v - apex + 0.03)
    posterior = (v - apex + 0.01 - 0.3 * (1 - 0.3 * p["kyphosis"]) * (a - 0.1) ** 2 + 0.03 * a) / 0.06
    anterior = (v - apex - 0.08 + 0.22 * (a - 0.8)) / 0.065
    density += (
        bone
        * thorax
        * (0.14 * _periodic_band(posterior, 0.3) + 0.06 * _periodic_band(anterior, 0.25) * _step(a - 0.25))
    )
    clavicle = 0.165 - 0.04 * p["kyphosis"] - 0.09 * a + 0.07 * a**2
    density += 0.3 * bone * _band(v - clavicle, 0.013) * _step(a - 0.05) * _step(0.58 - a)
    for x in (-0.42, 0.42):
        breast = _ellipsoid(u, v, (x * p["habitus"], 0.63), (0.3, 0.16)) * _step(v - 0.56, 0.08)
        density += 0.3 * p["breast"] * breast
    density += 1.5 * effects["devices"] * _frontal_devices(shape, u, v, study.devices, devices_rng)
    return _expose(density, exposure_rng)


def render_lateral(
    study: ChestStudy, effects: Mapping[str, float], shape: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """Lateral phantom of ``study`` (patient facing image left): float32 image in [0, 1], bright = dense."""
    anatomy_rng, markings_rng, devices_rng, exposure_rng = rng.spawn(4)  # as in render_frontal
    p = _anatomy_parameters(study, effects, anatomy_rng)
    u, v = _coordinates(shape)
    u = u / p["habitus"]
    density = 1.1 * np.sqrt(np.clip(1.0 - (u / np.interp(v, [0.0, 0.15, 1.0], [0.45, 0.8, 0.85])) ** 2, 0.0, None))

    apex = 0.12 - 0.02 * p["kyphosis"]
    across = np.clip((u + 0.55) / 1.1, 0.0, 1.0)  # 0 anterior, 1 posterior
    diaphragm = 0.68 + 0.12 * across**2  # lowest in the posterior costophrenic sulcus
    r2 = (u / 0.55) ** 2 + np.where(v < apex + 0.3, ((v - apex - 0.3) / 0.3) ** 2, 0.0)
    lung = _step(1.0 - r2, 0.05) * _step(diaphragm - v)
    heart = _step(1.0 - ((u + 0.3) / (0.3 * p["heart"])) ** 2 - ((v - 0.63) / (0.17 * p["heart"])) ** 2, 0.1)
    air = lung * (1.0 - 0.9 * heart)
    if any(study.effusion):
        level = 0.8 - p["effusion_height"] * (0.4 + 0.6 * across)  # fluid rises posteriorly
        air = air * (1.0 - np.clip(effects["effusion"] * lung * _step(v - level, 0.04), 0.0, 1.0))
    density = density - 0.85 * air + 0.04 * lung * _lung_markings(shape, markings_rng)
    vertebrae = 0.6 + 0.4 * np.cos(np.pi * v / 0.045) ** 8
    density += 0.4 * p["bone"] * _band(u - 0.65, 0.07) * vertebrae
    density += (
        0.25 * p["bone"] * _band(u + 0.66 + 0.05 * p["kyphosis"], 0.015) * _step(v - 0.2) * _step(0.6 - v)
    )  # sternum
    if study.devices:
        tube = _jitter(devices_rng, [(-0.1, 0.0), (-0.05, 0.3), (-0.1, 0.7)])
        density += 1.5 * effects["devices"] * _curve_mask(shape, tube, 2.0)
    return _expose(density, exposure_rng)


def _expose(density: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Turn attenuation into a radiograph: exposure curve, patient positioning, blur and quantum noise."""
    image = 1.0 - np.exp(-1.3 * np.clip(density, 0.0, None))
    rows, cols = image.shape
    angle = np.deg2rad(rng.normal(0.0, 2.0))
    scale = rng.uniform(0.95, 1.05)
    matrix = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / scale
    centre = np.array([rows, cols]) / 2.0
    offset = centre - matrix @ centre + rng.normal(0.0, 0.02, 2) * [rows, cols]
    image = ndimage.affine_transform(image, matrix, offset, order=1)
    image = ndimage.gaussian_filter(image, 0.7) ** rng.uniform(0.85, 1.15)
    return np.clip(image + rng.normal(0.0, 0.012, image.shape), 0.0, 1.0).astype(np.float32)


def render_view(
    study: ChestStudy, view: str, effects: Mapping[str, float], size: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """Render the ``"frontal"`` or ``"lateral"`` view of ``study`` at about ``size`` (rows vary by ±4 %)."""
    shape = (round(size[0] * rng.uniform(0.96, 1.04)), size[1])
    return (render_frontal if view == "frontal" else render_lateral)(study, effects, shape, rng)


def _view_names(study: ChestStudy) -> list[tuple[str, str]]:
    """(view, file stem) pairs of a study, in CheXpert's naming."""
    return [("frontal", "view1_frontal")] + ([("lateral", "view2_lateral")] if study.lateral else [])


def _image_encoding(index: int) -> str:
    # The real set is all JPG; a fixed share of PNGs exercises the other readers at any cohort size.
    return {3: "png8", 7: "png16"}.get(index % 10, "jpg")


def _save_picture(image: np.ndarray, path: Path, encoding: str) -> None:
    with atomic_output(path) as tmp:
        if encoding == "png16":
            Image.fromarray(np.rint(image * 65535).astype(np.uint16)).save(tmp, format="PNG")
        else:
            picture = Image.fromarray(np.rint(image * 255).astype(np.uint8), mode="L")
            picture.save(tmp, format="PNG" if encoding == "png8" else "JPEG", quality=90)


def write_chexpert(
    studies: list[ChestStudy], out: Path, seed: int, effects: Mapping[str, float], size: tuple[int, int], progress: bool
) -> None:
    """Write ``studies`` as CheXpert-v1.0-small: ``{train,valid}/patient*/study*/view*.jpg``, ``{train,valid}.csv``."""
    rows: dict[str, list[dict[str, object]]] = {"train": [], "valid": []}
    index = 0
    for study in tqdm(studies, desc="chexpert stand-in", unit="study", disable=not progress):
        for view, stem in _view_names(study):
            rng = np.random.default_rng([seed, zlib.crc32(b"chexpert"), index])
            encoding = _image_encoding(index)
            relative = (
                f"{study.split}/{study.patient}/study{study.study}/{stem}.{'jpg' if encoding == 'jpg' else 'png'}"
            )
            _save_picture(render_view(study, view, effects, size, rng), out / relative, encoding)
            rows[study.split].append(
                {
                    "Path": CHEXPERT_PREFIX + relative,
                    "Sex": study.recorded_sex,
                    "Age": study.age,
                    "Frontal/Lateral": view.capitalize(),
                    "AP/PA": study.ap_pa if view == "frontal" else "",
                    **study.labels,
                }
            )
            index += 1
    for split, table in rows.items():
        with atomic_output(out / f"{split}.csv") as tmp:
            pd.DataFrame(table, columns=list(CHEXPERT_COLUMNS)).to_csv(tmp, index=False)


def _person(rng: np.random.Generator) -> str:
    """A planted name in DICOM's ``Family^Given`` form."""
    return f"{rng.choice(PLANTED_SURNAMES)}^{rng.choice(PLANTED_GIVEN_NAMES)}"


_TIME = "%H%M%S.%f"  # DICOM TM with microseconds: long enough to be found, were it copied


def draw_identity(rng: np.random.Generator, age: int) -> PatientIdentity:
    """A fake patient identity whose birth date makes the patient ``age`` at the first study."""
    first = datetime.date(2002, 10, 1) + datetime.timedelta(days=int(rng.integers(0, 5000)))
    days_old = 365.25 * age + rng.uniform(0, 300)  # the fraction of a day sets the birth time
    born = datetime.datetime.combine(first, datetime.time()) - datetime.timedelta(days=days_old)
    surname, given = str(rng.choice(PLANTED_SURNAMES)), str(rng.choice(PLANTED_GIVEN_NAMES))
    patient_id, other_id = f"MRN{rng.integers(10**7, 10**8)}", f"INS-{rng.integers(10**6, 10**7)}"
    institution = str(rng.choice(list(PLANTED_INSTITUTIONS)))
    header = {
        "PatientName": f"{surname}^{given}",
        "PatientID": patient_id,
        "IssuerOfPatientID": f"{institution} MPI",
        "OtherPatientIDs": other_id,
        "OtherPatientNames": f"{surname}^{rng.choice(PLANTED_GIVEN_NAMES)}",  # as registered at an earlier visit
        "PatientBirthDate": born.strftime("%Y%m%d"),
        "PatientBirthTime": born.strftime(_TIME),
        "PatientBirthName": f"{rng.choice(PLANTED_SURNAMES)}^{given}",
        "PatientMotherBirthName": _person(rng),
        "PatientAddress": f"{rng.integers(2, 200)} {rng.choice(_STREETS)}, {rng.choice(_TOWNS)}",
        "PatientTelephoneNumbers": f"+44 1632 {rng.integers(960000, 961000)}",  # Ofcom's range for drama
        "MilitaryRank": str(rng.choice(_RANKS)),
        "Occupation": str(rng.choice(_OCCUPATIONS)),
        "MedicalRecordLocator": f"Records vault {rng.integers(1, 40)}, box {patient_id[3:]}",
        "AdditionalPatientHistory": f"Ex-smoker, {rng.integers(5, 60)} pack-years; older films under {other_id}",
        "PatientComments": f"Prefers to be called {given}; next of kin {_person(rng).replace('^', ' ')}",
    }
    return PatientIdentity(institution=institution, first_study=first, header=header)


def draw_visit(rng: np.random.Generator, identity: PatientIdentity, study: ChestStudy) -> Visit:
    """When, where and by whom ``study`` was made, as its DICOMs record it."""
    start = datetime.datetime.combine(identity.study_date(study.study), datetime.time(7)) + datetime.timedelta(
        seconds=float(rng.uniform(0, 12 * 3600))
    )
    site = "".join(word[0] for word in identity.institution.split())
    header = {
        "StudyDate": start.strftime("%Y%m%d"),
        "StudyTime": start.strftime(_TIME),
        "AccessionNumber": f"ACC{rng.integers(10**8, 10**9)}",
        "StudyID": f"ST{rng.integers(10**6, 10**7)}",
        "StudyDescription": f"XR CHEST {'2 VIEWS' if study.lateral else '1 VIEW'} ({site} {start.year})",
        "ReferringPhysicianName": f"{_person(rng)}^^Dr",
        "RequestingPhysician": f"{_person(rng)}^^Dr",
        "PhysiciansOfRecord": f"{_person(rng)}^^Dr",
        "NameOfPhysiciansReadingStudy": f"{_person(rng)}^^Dr",
        "PerformingPhysicianName": f"{_person(rng)}^^Dr",
        "OperatorsName": _person(rng),  # the radiographer
        "InstitutionName": identity.institution,
        "InstitutionAddress": PLANTED_INSTITUTIONS[identity.institution],
        "InstitutionalDepartmentName": str(rng.choice(_DEPARTMENTS)),
        "StationName": f"{site}XR{rng.integers(1, 20):02d}",
        "DeviceSerialNumber": f"SN{rng.integers(10**6, 10**7)}",
    }
    return Visit(start=start, header=header)


def radiograph_dataset(
    image: np.ndarray,
    study: ChestStudy,
    view: str,
    identity: PatientIdentity,
    visit: Visit,
    encoding: tuple[str, str, int, float, float],
    uid_seed: str,
) -> Dataset:
    """A CR/DX DICOM dataset of ``image`` (display values in [0, 1], bright = dense).

    ``encoding`` is (modality, photometric interpretation, bits stored, rescale slope, rescale
    intercept). MONOCHROME1 stores inverted values (high = dark), as such detectors do. The header
    carries the patient's and the visit's identifying attributes, and this image's own dates, times,
    notes and private block.
    """
    modality, photometric, bits, slope, intercept = encoding
    top = 2**bits - 1
    stored = np.rint((1.0 - image if photometric == "MONOCHROME1" else image) * top).astype(np.uint16)
    sop_class = "1.2.840.10008.5.1.4.1.1.1" if modality == "CR" else "1.2.840.10008.5.1.4.1.1.1.1"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    # UIDs hashed from the seed and the file: the same seed writes the same files.
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, "instance"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed.rsplit("/", 1)[0], "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.Modality = modality
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    for keyword, value in {**identity.header, **visit.header}.items():
        setattr(ds, keyword, value)
    ds.PatientSex = {"Male": "M", "Female": "F"}.get(study.recorded_sex, "O")
    ds.PatientAge = f"{study.age:03d}Y"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1 if view == "frontal" else 2
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = study.ap_pa if view == "frontal" else "LL"
    exposed = visit.start + datetime.timedelta(minutes=4 * ds.InstanceNumber)
    processed = exposed + datetime.timedelta(seconds=37)  # the reader's image is made after the exposure
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ds.InstanceCreationDate = exposed.strftime("%Y%m%d")
    ds.SeriesTime = ds.AcquisitionTime = exposed.strftime(_TIME)
    ds.AcquisitionDateTime = exposed.strftime(f"%Y%m%d{_TIME}")
    ds.ContentTime = ds.InstanceCreationTime = processed.strftime(_TIME)
    ds.SeriesDescription = f"CHEST {ds.ViewPosition} {visit.header['StationName']}"
    ds.ProtocolName = f"Thorax {ds.ViewPosition} ({identity.institution})"
    family, given = identity.header["PatientName"].split("^")
    ds.ImageComments = f"ID band checked: {given} {family}, {identity.header['PatientID']}"
    # A vendor block, which de-identification must drop or clean: here the plate's barcode label.
    label = f"{identity.header['PatientName']} {identity.header['PatientID']} {visit.header['AccessionNumber']}"
    ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True).add_new(0x10, "LO", label)
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    # Square, as a detector's pixels are: the rows that render_view varies make a taller or shorter
    # film (as CheXpert's heights vary), not finer rows, which the preprocessing would resample.
    spacing = [f"{FIELD_MM[1] / image.shape[1]:.4f}"] * 2
    ds.ImagerPixelSpacing = spacing
    ds.PixelSpacing = spacing
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "US"
    low, high = np.percentile(stored, [0.5, 99.5]) * slope + intercept
    ds.WindowCenter = f"{(low + high) / 2:.1f}"
    ds.WindowWidth = f"{max(high - low, 1.0):.1f}"
    ds.PixelData = stored.tobytes()
    return ds


def _dicom_encoding(index: int) -> tuple[str, str, int, float, float]:
    # Cycle through the variants so that every cohort, however small, has all of them.
    modality = ("CR", "DX")[index % 2]
    photometric = ("MONOCHROME2", "MONOCHROME1", "MONOCHROME2")[index % 3]
    bits, slope, intercept = ((12, 1.0, 0.0), (16, 0.5, -1024.0), (16, 1.0, 0.0), (12, 2.0, 100.0))[index % 4]
    return modality, photometric, bits, slope, intercept


def write_chexpert_plus(
    studies: list[ChestStudy], out: Path, seed: int, effects: Mapping[str, float], size: tuple[int, int], progress: bool
) -> None:
    """Write ``studies`` as CheXpert Plus: ``{train,valid}/patient*/study*/view*.dcm`` and ``df_chexpert_plus.csv``.

    The identifying attributes (:data:`IDENTIFYING_ATTRIBUTES` and a private block) exist only in
    the DICOM headers; the table has the dataset's own pseudonymous ``deid_patient_id``.
    """
    rows = []
    identities: dict[str, PatientIdentity] = {}
    index = 0
    for study in tqdm(studies, desc="chexpert_plus stand-in", unit="study", disable=not progress):
        study_rng = np.random.default_rng([seed, zlib.crc32(b"chexpert_plus/study"), index])
        if study.patient not in identities:
            identities[study.patient] = draw_identity(study_rng, study.age)
        identity = identities[study.patient]
        visit = draw_visit(study_rng, identity, study)
        for view, stem in _view_names(study):
            rng = np.random.default_rng([seed, zlib.crc32(b"chexpert_plus"), index])
            relative = f"{study.split}/{study.patient}/study{study.study}/{stem}"
            image = render_view(study, view, effects, size, rng)
            ds = radiograph_dataset(
                image,
                study,
                view,
                identity,
                visit,
                _dicom_encoding(index),
                f"{seed}/{relative}",
            )
            with atomic_output(out / f"{relative}.dcm") as tmp:
                ds.save_as(tmp, enforce_file_format=True)
            rows.append(
                {
                    "path_to_image": f"{relative}.jpg",
                    "path_to_dcm": f"{relative}.dcm",
                    "frontal_lateral": view.capitalize(),
                    "ap_pa": study.ap_pa if view == "frontal" else "",
                    "sex": study.recorded_sex,
                    "age": study.age,
                    "deid_patient_id": study.patient,
                    "patient_report_date_order": study.study,
                    **study.labels,
                }
            )
            index += 1
    with atomic_output(out / "df_chexpert_plus.csv") as tmp:
        pd.DataFrame(rows, columns=list(CHEXPERT_PLUS_COLUMNS)).to_csv(tmp, index=False)


def generate_chest_xray_cohort(
    kind: str,
    n: int,
    out: Path,
    seed: int,
    effects: Mapping[str, float],
    image_size: tuple[int, int] = IMAGE_SIZE,
    progress: bool = True,
) -> Path:
    """Write ``n`` chest X-ray stand-in patients in the ``kind`` layout.

    See :func:`~mimm_med.data.standins.generate_cohort`.
    """
    studies = draw_studies(n, np.random.default_rng([seed, zlib.crc32(kind.encode())]))
    writer = write_chexpert if kind == "chexpert" else write_chexpert_plus
    writer(studies, out, seed, effects, image_size, progress)
    return out
