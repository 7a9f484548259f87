"""The same seed writes byte-identical files (NIfTI and DICOM included); another seed writes other images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from mimm_med.data.standins import generate_cohort


def _files(out: Path) -> dict[Path, bytes]:
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind, resolution_mm", [("ukb", 6.0), ("chexpert_plus", 8.0)])
def test_same_seed_same_bytes_other_seed_other_images(tmp_path, kind, resolution_mm):
    first, again, other = (
        generate_cohort(kind, 2, tmp_path / name, seed=seed, resolution_mm=resolution_mm, progress=False)
        for name, seed in (("a", 5), ("b", 5), ("c", 6))
    )
    # gzip headers (mtime, name) and DICOM UIDs are part of the bytes: none of them may depend on the run.
    assert _files(first) == _files(again)
    if kind == "chexpert_plus":  # same paths (patientNNNNN) under another seed, other pixels and UIDs
        a, c = (pydicom.dcmread(out / "train/patient00001/study1/view1_frontal.dcm") for out in (first, other))
        assert a.SOPInstanceUID != c.SOPInstanceUID and a.PatientID != c.PatientID
        assert a.pixel_array.shape != c.pixel_array.shape or not np.array_equal(a.pixel_array, c.pixel_array)
    else:  # other eids, so other image paths
        images = [{path for path in _files(out) if path.suffix == ".gz"} for out in (first, other)]
        assert len(images[0]) == 2 and not images[0] & images[1]
