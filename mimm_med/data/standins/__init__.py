"""Stand-in cohorts: generated images written exactly in the layouts of the real cohorts.

The real cohorts (UK Biobank and NAKO brain MRI, CheXpert chest X-rays) are access-controlled;
every test and demo runs on stand-ins that :func:`generate_cohort` writes in their folder layouts,
file formats and metadata tables, so that the code that reads them reads the real ones unchanged.

Examples
--------
>>> from mimm_med.data.standins import generate_cohort
>>> generate_cohort("ukb", n=4, out="raw/ukb", resolution_mm=4, effects={"age": 2.0})  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping
from numbers import Real
from pathlib import Path

from mimm_med.checks import is_whole_number

from .brain import BRAIN_EFFECTS, BRAIN_RESOLUTION_MM, generate_brain_cohort
from .chest_xray import CXR_EFFECTS, FIELD_MM, IMAGE_SIZE, generate_chest_xray_cohort

__all__ = ["COHORT_KINDS", "EFFECTS", "generate_cohort", "resolve_effects"]

EFFECTS: dict[str, tuple[str, ...]] = {
    "ukb": BRAIN_EFFECTS,
    "nako": BRAIN_EFFECTS,
    "chexpert": CXR_EFFECTS,
    "chexpert_plus": CXR_EFFECTS,
}
COHORT_KINDS: tuple[str, ...] = tuple(EFFECTS)


def resolve_effects(kind: str, effects: Mapping[str, float] | None) -> dict[str, float]:
    """Every effect of ``kind`` with its size: 1.0 unless ``effects`` says otherwise.

    Raises
    ------
    ValueError
        For an unknown effect name (the message lists the valid ones) or a size that is not a finite
        number >= 0.
    """
    effects = dict(effects or {})
    unknown = sorted(set(effects) - set(EFFECTS[kind]))
    if unknown:
        raise ValueError(f"unknown effect(s) {unknown} for cohort kind {kind!r}; valid effects: {list(EFFECTS[kind])}")
    # NaN passes a `< 0` test and then fills every image with NaN: refuse anything not a finite number >= 0.
    invalid = {
        name: size
        for name, size in effects.items()
        if isinstance(size, bool) or not isinstance(size, Real) or not math.isfinite(size) or size < 0
    }
    if invalid:
        raise ValueError(f"effect sizes must be finite numbers >= 0 (0 = no effect, 1 = default), got {invalid}")
    return {name: float(effects.get(name, 1.0)) for name in EFFECTS[kind]}


def generate_cohort(
    kind: str,
    n: int,
    out: str | Path,
    seed: int = 0,
    effects: Mapping[str, float] | None = None,
    resolution_mm: float | None = None,
    progress: bool = True,
) -> Path:
    """Write a stand-in cohort of ``n`` subjects in the real layout of ``kind`` and return ``out``.

    Parameters
    ----------
    kind
        One of :data:`COHORT_KINDS`: ``"ukb"``, ``"nako"`` (brain T1 NIfTI), ``"chexpert"``
        (JPG/PNG and CSVs), ``"chexpert_plus"`` (DICOM and a CSV).
    n
        Number of subjects (chest X-ray patients have 1 to 3 studies each).
    out
        Output folder, the cohort's raw folder: created if missing, refused if not empty (the files
        of an earlier cohort would mix with this one's without being in its table). The cohort is
        written to ``.<name>.partial`` beside it and renamed to ``out`` when complete, so ``out``
        never holds part of a cohort.
    seed
        Random seed, an integer >= 0: the same seed writes the same files.
    effects
        Effect name -> size (0 = not visible in the images, 1 = default, larger = stronger);
        valid names per kind in :data:`EFFECTS`. Effects not given have size 1.
    resolution_mm
        Voxel / pixel size. Brain: ~1 mm by default (MNI-sized volumes); 3 or 4 makes small
        volumes for tests; :data:`~mimm_med.data.standins.brain.BRAIN_RESOLUTION_MM` is the range
        allowed. Chest X-ray: the phantom spans a fixed field, so this sets the image size (at
        least 16 pixels a side); by default 390 x 320 pixels, like CheXpert-small (~1.1 mm).
    progress
        Show a progress bar with rate and ETA.

    Raises
    ------
    ValueError
        For an unknown ``kind`` or effect, ``n`` or ``seed`` that is not a whole number (``n`` >= 1,
        ``seed`` >= 0), a ``resolution_mm`` that is not a finite positive number (for the brain:
        outside :data:`~mimm_med.data.standins.brain.BRAIN_RESOLUTION_MM`), or an ``out`` folder
        that is not empty.
    """
    if kind not in EFFECTS:
        raise ValueError(f"unknown cohort kind {kind!r}; choose one of {list(COHORT_KINDS)}")
    for name, value, minimum in (("n (the number of subjects)", n, 1), ("seed", seed, 0)):
        if not is_whole_number(value, minimum):
            raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    n, seed = int(n), int(seed)
    if resolution_mm is not None:
        _check_resolution(kind, resolution_mm)
    sizes = resolve_effects(kind, effects)
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(
            f"output folder {out} is not empty; a stand-in cohort is written into an empty or new folder, "
            "so delete it or choose another one"
        )
    # Written beside `out` and renamed into place at the end, so that an existing `out` is a whole
    # cohort: the demo and the benchmark reuse one if it exists.
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted run left
    partial.mkdir(parents=True)
    if kind in ("ukb", "nako"):
        generate_brain_cohort(kind, n, partial, seed, sizes, resolution_mm, progress)
    else:
        size = IMAGE_SIZE if resolution_mm is None else tuple(max(16, round(f / resolution_mm)) for f in FIELD_MM)
        generate_chest_xray_cohort(kind, n, partial, seed, sizes, size, progress)
    os.replace(partial, out)  # an empty `out` is replaced too
    return out


def _check_resolution(kind: str, resolution_mm: float) -> None:
    """Refuse a ``resolution_mm`` that is not a finite positive number, or outside the brain's range."""
    if isinstance(resolution_mm, bool) or not isinstance(resolution_mm, Real) or not math.isfinite(resolution_mm):
        raise ValueError(f"resolution_mm must be a finite number of millimetres, got {resolution_mm!r}")
    if resolution_mm <= 0:
        raise ValueError(f"resolution_mm must be positive, got {resolution_mm}")
    low, high = BRAIN_RESOLUTION_MM
    if kind in ("ukb", "nako") and not low <= resolution_mm <= high:
        raise ValueError(
            f"resolution_mm for the brain stand-ins must lie in [{low:g}, {high:g}] mm, got {resolution_mm:g}: finer "
            "voxels only interpolate the 1 mm template and need tens of GB, coarser ones lose the age effect "
            "(no cortex left to thin)"
        )
