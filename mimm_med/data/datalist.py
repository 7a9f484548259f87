"""Manifests as MONAI datalists: one dict per image with integer-coded labels."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from mimm_med.data.confounding import SPLIT_NAMES
from mimm_med.data.manifest import (
    COHORT,
    IMAGE,
    STATUS,
    STATUS_OK,
    SUBJECT,
    ManifestError,
    file_size,
    label_columns,
    load_manifest,
    read_manifest,
    validate_manifest,
    validate_splits,
)
from mimm_med.data.pseudonym import canonical_text

PREPARE_HINT = (
    "make the splits with `mimm-med demo --prepare-only` (stand-in brain cohort), `mimm-med cohort digits --out "
    "<dataset_dir>` (Digits-Morpho), or with `mimm-med cohort generate`, `mimm-med preprocess` and "
    "`mimm-med cohort split --out <dataset_dir>` for your own cohort"
)


def primary_first(label_levels: Mapping[str, Sequence], primary: str) -> list[str]:
    """The factors of ``label_levels`` with ``primary`` first, the others in their order: the network's parts.

    ``MIMMXNet`` and ``MIMMXObjective`` take the first part for f_y, so a network built from
    ``label_levels`` in their own order would train another factor's part as the primary task than
    the one that ``--primary`` names and validation scores.

    Raises
    ------
    ManifestError
        If ``primary`` is not a factor of ``label_levels``, naming both overrides.

    Examples
    --------
    >>> primary_first({"digit": [0, 1], "thickness": [0, 1], "rotation": [0, 1]}, "thickness")
    ['thickness', 'digit', 'rotation']
    """
    if primary not in label_levels:
        raise ManifestError(
            f"primary {primary!r} is not a factor of label_levels {list(label_levels)}: give --primary one of "
            "them, or add it to --label_levels with its values"
        )
    return [primary, *(name for name in label_levels if name != primary)]


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
    if primary is not None:
        primary_first(label_levels, primary)
    if not path.is_file():
        raise ManifestError(f"no manifest at {path}: {PREPARE_HINT}")
    try:
        table = load_manifest(path, label_values={name: list(levels) for name, levels in label_levels.items()})
    except ManifestError as error:
        hint = _label_levels_hint(path, label_levels, primary)
        if hint is None:
            raise
        raise ManifestError(f"{error}; {hint}") from None
    codes = {name: {canonical_text(v): i for i, v in enumerate(levels)} for name, levels in label_levels.items()}
    records = []
    for row in table.to_dict("records"):
        record = {"image": row[IMAGE], "subject_id": row[SUBJECT]}
        record.update({name: codes[name][canonical_text(row[name])] for name in label_levels})
        if primary is not None:
            record["label"] = record[primary]
        records.append(record)
    for name, levels in label_levels.items():
        absent = [level for code, level in enumerate(levels) if records and all(r[name] != code for r in records)]
        if absent:  # a head class no image of this set has: never trained on (training) or scored (a test set)
            warnings.warn(
                f"{path}: no image has {name} {' or '.join(map(repr, absent))}, which label_levels lists: drop it "
                "from --label_levels if the cohort has none, or split with more subjects",
                stacklevel=2,
            )
    return records


def _label_levels_hint(path: Path, label_levels: Mapping[str, Sequence], primary: str | None) -> str | None:
    """The ``--label_levels`` of a bundle that fit the manifest at ``path``; ``None`` if ``label_levels`` do.

    A bundle's defaults name the labels of its stand-in cohort; one's own cohort has its own, and the
    manifest error alone points at the card instead.
    """
    table = read_manifest(path)
    table = table[table[STATUS] == STATUS_OK]
    fitting, counts = {}, {}
    for name in (*label_columns(table), COHORT):
        values = {canonical_text(v) for v in table[name].dropna()}
        counts[name] = len(values)
        known = [canonical_text(v) for v in label_levels.get(name, ())]
        if values and values <= set(known):
            fitting[name] = known
        elif len(values) == 2:  # the factors `cohort split` can have confounded
            fitting[name] = sorted(values)
    # Leaving out a one-valued label (the cohort of a single-cohort study) fits the manifest; leaving out
    # the primary, or a label with a value too many (a stray '7' in a 0/1 label), does not: the rows are at fault.
    if any(name not in fitting and (name == primary or counts.get(name, 0) > 2) for name in label_levels if name in counts):
        return None
    if primary in fitting:
        fitting = {primary: fitting.pop(primary), **fitting}
    if all(fitting.get(name) == [canonical_text(v) for v in levels] for name, levels in label_levels.items()):
        return None  # the bundle's labels fit: the error is about something else
    override = f'--label_levels "{fitting}"' + ("" if primary in fitting or primary is None else " --primary <label>")
    return (
        f"or, if the manifest's labels are right, give the bundle the two-valued labels of your cohort (the same in "
        f"training, evaluation and inference): {override}"
    )


def image_datalist(manifest: str | Path) -> list[dict]:
    """``{"image", "image_path", "subject_id"}`` dicts of the ``ok`` rows of a manifest, for inference.

    Labels are not needed, so they are not checked: the label columns of new images may be blank. An
    image missing from disk is left to :class:`~mimm_med.data.skipping.SkippingDataset`, which skips it
    with a warning as it does an unreadable one; only a manifest none of whose images exist is refused
    (it was moved away from them).
    """
    path = Path(manifest)
    if not path.is_file():
        raise ManifestError(f"no manifest at {path}: {PREPARE_HINT}")
    table = read_manifest(path)
    table = table.loc[table[STATUS] == STATUS_OK, [SUBJECT, IMAGE, COHORT, STATUS]]
    # one image found is enough to know the manifest sits by its images: no stat of the others here
    found_one = any(file_size(image) is not None for image in table[IMAGE])
    validate_manifest(table, path, check_files=not found_one)  # images listed once, with subject ids
    if table.empty:
        raise ManifestError(
            f"{path} lists no image to predict (no row, or none with status 'ok'): give an --input_manifest with images"
        )
    return [{"image": image, "image_path": image, "subject_id": subject} for image, subject in zip(table[IMAGE], table[SUBJECT])]


def check_split_folder(dataset_dir: str | Path, required: Sequence[str] = ("train", "val")) -> None:
    """Refuse a split folder that a bundle must not read: a required split missing or empty, or a subject in two splits.

    ``cohort split`` writes disjoint, non-empty splits where it can; a folder edited by hand, or split
    from too few subjects, would otherwise train on test subjects or leave training without the
    validation that picks its best checkpoint.

    Parameters
    ----------
    dataset_dir
        Folder of ``train.csv``, ``val.csv`` and the ``test-*.csv`` sets.
    required
        Splits that must exist and hold at least one ``ok`` image; the others are checked only for
        shared subjects, where present.

    Raises
    ------
    ManifestError
        Naming the folder, the split and the fix.
    """
    folder = Path(dataset_dir)
    splits = {}
    for name in SPLIT_NAMES:
        path = folder / f"{name}.csv"
        if not path.is_file():
            if name in required:
                raise ManifestError(f"no manifest at {path}: {PREPARE_HINT}")
            continue
        table = read_manifest(path)
        splits[name] = table[table[STATUS] == STATUS_OK]
        if name in required and splits[name].empty:
            raise ManifestError(
                f"{path} holds no usable image: split a cohort with more subjects, or give {name} a larger share "
                "(`mimm-med cohort split --fractions TRAIN,VAL,TEST`)"
            )
    try:
        validate_splits(splits)
    except ManifestError as error:
        raise ManifestError(f"{folder}: {error}") from None
