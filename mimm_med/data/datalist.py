"""Manifests as MONAI datalists: one dict per image with integer-coded labels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from mimm_med.data.manifest import IMAGE, SUBJECT, ManifestError, load_manifest
from mimm_med.data.pseudonym import canonical_text

PREPARE_HINT = (
    "make the splits with `mimm-med demo --prepare-only` (stand-in brain cohort), `mimm-med cohort digits --out "
    "<dataset_dir>` (Digits-Morpho), or with `mimm-med cohort generate`, `mimm-med preprocess` and "
    "`mimm-med cohort split --out <dataset_dir>` for your own cohort"
)


def manifest_datalist(
    manifest: str | Path,
    label_levels: Mapping[str, Sequence],
    primary: str | None = None,
) -> list[dict]:
    """Validated ``ok`` rows of a manifest as ``{"image", "subject_id", <factor>: code, ...}`` dicts.

    Parameters
    ----------
    manifest
        Manifest CSV (e.g. a split written by ``mimm-med cohort split``).
    label_levels
        Factor → its values in code order, e.g. ``{"sex": ["female", "male"]}``; a value outside the
        list is an error (naming the file) rather than a silent new class.
    primary
        If given, its code is also stored under ``"label"``, the key MONAI's evaluators read.

    Raises
    ------
    ManifestError
        Missing manifest (saying how to make one), missing files, or labels outside ``label_levels``.
    """
    path = Path(manifest)
    if not path.is_file():
        raise ManifestError(f"no manifest at {path}: {PREPARE_HINT}")
    table = load_manifest(path, label_values={name: list(levels) for name, levels in label_levels.items()})
    codes = {name: {canonical_text(v): i for i, v in enumerate(levels)} for name, levels in label_levels.items()}
    records = []
    for row in table.to_dict("records"):
        record = {"image": row[IMAGE], "subject_id": row[SUBJECT]}
        record.update({name: codes[name][canonical_text(row[name])] for name in label_levels})
        if primary is not None:
            record["label"] = record[primary]
        records.append(record)
    return records


def image_datalist(manifest: str | Path) -> list[dict]:
    """``{"image", "image_path"}`` dicts of the ``ok`` rows of a manifest, for inference (labels not needed)."""
    path = Path(manifest)
    if not path.is_file():
        raise ManifestError(f"no manifest at {path}: {PREPARE_HINT}")
    table = load_manifest(path)
    return [{"image": image, "image_path": image} for image in table[IMAGE]]
