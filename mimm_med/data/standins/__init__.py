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

from collections.abc import Mapping
from pathlib import Path

from .brain import BRAIN_EFFECTS, generate_brain_cohort
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
        For an unknown effect name (the message lists the valid ones) or a negative size.
    """
    effects = dict(effects or {})
    unknown = sorted(set(effects) - set(EFFECTS[kind]))
    if unknown:
        raise ValueError(f"unknown effect(s) {unknown} for cohort kind {kind!r}; valid effects: {list(EFFECTS[kind])}")
    negative = {name: size for name, size in effects.items() if size < 0}
    if negative:
        raise ValueError(f"effect sizes must be >= 0 (0 = no effect, 1 = default), got {negative}")
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
        Output folder, the cohort's raw folder; created if missing.
    seed
        Random seed: the same seed writes the same files.
    effects
        Effect name -> size (0 = not visible in the images, 1 = default, larger = stronger);
        valid names per kind in :data:`EFFECTS`. Effects not given have size 1.
    resolution_mm
        Voxel / pixel size. Brain: ~1 mm by default (MNI-sized volumes); 3 or 4 makes small
        volumes for tests. Chest X-ray: the phantom spans a fixed field, so this sets the image
        size; by default 390 x 320 pixels, like CheXpert-small (~1.1 mm).
    progress
        Show a progress bar with rate and ETA.

    Raises
    ------
    ValueError
        For an unknown ``kind`` or effect, ``n`` < 1 or a non-positive ``resolution_mm``.
    """
    if kind not in EFFECTS:
        raise ValueError(f"unknown cohort kind {kind!r}; choose one of {list(COHORT_KINDS)}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if resolution_mm is not None and resolution_mm <= 0:
        raise ValueError(f"resolution_mm must be positive, got {resolution_mm}")
    sizes = resolve_effects(kind, effects)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if kind in ("ukb", "nako"):
        return generate_brain_cohort(kind, n, out, seed, sizes, resolution_mm, progress)
    size = IMAGE_SIZE if resolution_mm is None else tuple(max(16, round(f / resolution_mm)) for f in FIELD_MM)
    return generate_chest_xray_cohort(kind, n, out, seed, sizes, size, progress)
