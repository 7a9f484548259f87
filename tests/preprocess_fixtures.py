"""Tiny raw cohorts for the preprocessing tests: NIfTI, DICOM series, DICOM radiographs, PNG and JPG.

Every DICOM carries the identifying attributes of a CheXpert Plus stand-in (``PLANTED_HEADER``,
whose values to search outputs for are ``PLANTED``); raw paths carry the source ids, as UK Biobank
and CheXpert paths do.
"""

from __future__ import annotations

import copy
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mimm_med.data.standins import chest_xray

KEY = b"a-test-key-that-is-long-enough"
BRAIN_CONFIG = Path(__file__).parents[1] / "preprocessing" / "brain_t1.json"
XRAY_CONFIG = Path(__file__).parents[1] / "preprocessing" / "chest_xray.json"
SMALL_BRAIN = {"spatial_size": [16, 16, 16]}
SMALL_XRAY = {"spatial_size": 32}
_DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def identifying_values(ds: Dataset) -> set[str]:
    """Every identifying value in ``ds``'s header, as text that no output may contain.

    The values of the PS3.15 Basic Profile attributes the stand-ins plant
    (:data:`~mimm_med.data.standins.chest_xray.IDENTIFYING_ATTRIBUTES`) and of every private
    element; person names also by their parts, which a writer might copy one by one.
    """
    values = set()
    for element in ds.iterall():
        # The private creator names the vendor, not the patient.
        if element.keyword in chest_xray.IDENTIFYING_ATTRIBUTES or (
            element.tag.is_private and not element.tag.is_private_creator
        ):
            values.add(str(element.value))
            if element.VR == "PN":
                values |= {part for part in str(element.value).split("^") if len(part) > 3}  # not "Dr"
    return values - {""}


def searchable_bytes(path: Path) -> bytes:
    """``path``'s bytes, with what they hold compressed: a gzipped NIfTI's header, a PNG's text chunks."""
    content = path.read_bytes()
    if path.suffix == ".gz":
        content += gzip.decompress(content)
    elif path.suffix == ".png" and content:
        with Image.open(path) as image:
            content += repr(image.text).encode()  # tEXt, zTXt and iTXt chunks, decompressed
    return content


def _stand_in_header() -> Dataset:
    """The identifying elements of a CheXpert Plus stand-in DICOM but its UIDs, which every file has its own of."""
    rng = np.random.default_rng(0)
    study = chest_xray.draw_studies(1, rng)[0]
    identity = chest_xray.draw_identity(rng, study.age)
    stand_in = chest_xray.radiograph_dataset(
        np.zeros((2, 2)), study, "frontal", identity, chest_xray.draw_visit(rng, identity, study),
        ("DX", "MONOCHROME2", 12, 1.0, 0.0), "fixture",
    )  # fmt: skip
    header = Dataset()
    for element in stand_in:
        if element.tag.is_private or (element.keyword in chest_xray.IDENTIFYING_ATTRIBUTES and element.VR != "UI"):
            header.add(element)
    return header


PLANTED_HEADER = _stand_in_header()
PLANTED = tuple(sorted(identifying_values(PLANTED_HEADER)))


def head_volume(seed: int, size: int = 24) -> np.ndarray:
    """A bright noisy ball in a dark noisy box: a head as far as the pipeline can tell."""
    rng = np.random.default_rng(seed)
    radius = np.sqrt(((np.mgrid[:size, :size, :size] - size / 2) ** 2).sum(0))
    return ((radius < size / 3) * (80.0 + 10 * seed) + rng.random((size,) * 3) * 5).astype(np.float32)


def write_nifti(path: Path, array: np.ndarray, spacing: float = 2.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([spacing, spacing, spacing, 1.0])), path)
    return path


def write_dicom_series(folder: Path, volume: np.ndarray) -> Path:
    """One DICOM file per slice, with the planted attributes but the private ones, readable by ITK as a series."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(volume.astype(np.int16))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = generate_uid()
    for k in range(image.GetDepth()):
        tags = {
            **{f"{e.tag.group:04x}|{e.tag.element:04x}": str(e.value) for e in PLANTED_HEADER if not e.tag.is_private},
            "0008|0060": "MR", "0020|000d": generate_uid(), "0020|000e": series, "0020|0013": str(k),
            "0020|0032": f"0\\0\\{2 * k}", "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": "2\\2", "0018|0050": "2",
        }
        slice_ = image[:, :, k]
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(slice_)
    return folder


def radiograph(rows: int = 40, columns: int = 30) -> np.ndarray:
    """12-bit radiograph-like image: a bright block top-left on a left-to-right ramp."""
    image = np.zeros((rows, columns))
    image[: rows // 4, : columns // 3] = 1.0
    image += np.linspace(0.0, 0.5, columns)[None]
    return np.round(image / image.max() * 4095).astype(np.uint16)


def write_dicom_xray(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    view: str = "PA",
    with_pixels: bool = True,
    window: tuple[float, float] | None = None,
) -> Path:
    """A 12-bit DX radiograph with the planted identifying attributes (``PLANTED_HEADER``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _DX_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = _DX_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.update(copy.deepcopy(PLANTED_HEADER))
    ds.Modality, ds.ViewPosition = "DX", view
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.2, 0.2]
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if with_pixels:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_png(path: Path, pixels: np.ndarray, mode: str = "I;16") -> Path:
    """PNG or JPG (by suffix) of 12-bit ``pixels`` as 16-bit (``"I;16"``), 8-bit (``"L"``) or ``"RGB"``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scaled = (pixels * 16).astype(np.uint16) if mode == "I;16" else (pixels // 16).astype(np.uint8)
    image = Image.fromarray(scaled)
    (image.convert("RGB") if mode == "RGB" else image).save(path)
    return path


def _records(rows: list[tuple[str, Path]], cohort: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "source_id": [source_id for source_id, _ in rows],
            "image": [str(path) for _, path in rows],
            "sex": ["female" if i % 2 else "male" for i in range(len(rows))],
            "age_group": ["old" if i % 3 else "young" for i in range(len(rows))],
            "cohort": cohort,
        }
    )


def brain_cohort(raw: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A UK Biobank-style raw folder: 4 good NIfTIs, a good DICOM series and 4 bad files, 1 bad metadata row.

    Returns the records and problems a cohort card's ``index`` would.
    """
    def t1(eid: str) -> Path:
        return raw / f"{eid}_20252_2_0" / "T1" / "T1.nii.gz"

    rows = [(str(1000001 + i), write_nifti(t1(str(1000001 + i)), head_volume(i))) for i in range(4)]
    truncated = t1("1000005")
    write_nifti(truncated, head_volume(5))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    with_nan = head_volume(6)
    with_nan[5, 5, 5] = np.nan
    empty = t1("1000008")
    empty.parent.mkdir(parents=True)
    empty.touch()
    rows += [
        ("1000005", truncated),
        ("1000006", write_nifti(t1("1000006"), with_nan)),
        ("1000007", write_nifti(t1("1000007"), head_volume(7)[:, :, 0])),
        ("1000008", empty),
        ("1000009", write_dicom_series(raw / "1000009_20252_2_0" / "T1" / "dicom", head_volume(9))),
    ]
    problems = pd.DataFrame(
        {"source_id": ["1000010"], "image": [str(t1("1000010"))], "reason": ["age 21003-2.0 is blank"], "cohort": "ukb"}
    )
    return _records(rows, "ukb"), problems


BRAIN_FAILURES = {
    "1000005": "Compressed file ended",
    "1000006": "NaN",
    "1000007": "3D image",
    "1000008": "empty file",
    "1000010": "metadata: age",
}


def xray_cohort(raw: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A CheXpert-style raw folder with DICOM (MONOCHROME1/2, windowed), 8/16-bit PNG, RGB PNG and JPG images.

    Bad: a DICOM without pixel data, a lateral DICOM, a zero-byte PNG.
    """
    pixels = radiograph()

    def view(patient: str, name: str) -> Path:
        return raw / "train" / f"patient{patient}" / "study1" / name

    empty = view("00009", "view1_frontal.png")
    empty.parent.mkdir(parents=True)
    empty.touch()
    rows = [
        ("patient00001", write_dicom_xray(view("00001", "view1_frontal.dcm"), pixels)),
        ("patient00002", write_dicom_xray(view("00002", "view1_frontal.dcm"), 4095 - pixels, "MONOCHROME1")),
        ("patient00003", write_dicom_xray(view("00003", "view1_frontal.dcm"), pixels, window=(2048, 3000))),
        ("patient00004", write_png(view("00004", "view1_frontal.png"), pixels)),
        ("patient00004", write_png(view("00004", "view2_frontal.png"), pixels, "L")),
        ("patient00005", write_png(view("00005", "view1_frontal.png"), pixels, "RGB")),
        ("patient00006", write_png(view("00006", "view1_frontal.jpg"), pixels, "L")),
        ("patient00007", write_dicom_xray(view("00007", "view1_frontal.dcm"), pixels, with_pixels=False)),
        ("patient00008", write_dicom_xray(view("00008", "view2_lateral.dcm"), pixels, view="LL")),
        ("patient00009", empty),
    ]
    return _records(rows, "chexpert_plus"), pd.DataFrame(columns=["source_id", "image", "reason", "cohort"])


XRAY_FAILURES = {"patient00007": "no pixel data", "patient00008": "view position", "patient00009": "empty file"}
