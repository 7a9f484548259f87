"""Manifest schema, reading, writing and validation.

A manifest is a CSV with one row per image::

    subject_id, image, <label_1>, ..., <label_K>, cohort, status

``subject_id`` is pseudonymous, ``image`` is a path relative to the manifest's folder (so an output
folder can be moved or shared as a whole), every other column but ``cohort`` and ``status`` is a
label, and ``status`` is ``ok`` or ``failed``. In memory (:func:`read_manifest`) ``image`` holds
absolute paths; :func:`write_manifest` makes them relative again.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import pandas as pd

from mimm_med.data.pseudonym import canonical_text
from mimm_med.data.writers import atomic_output

SUBJECT, IMAGE, COHORT, STATUS = "subject_id", "image", "cohort", "status"
RESERVED_COLUMNS: tuple[str, ...] = (SUBJECT, IMAGE, COHORT, STATUS)
STATUS_OK, STATUS_FAILED = "ok", "failed"
PIPELINE_RECORD = "pipeline.json"  # beside the manifests of a `mimm-med preprocess` output folder
KEY_FINGERPRINT = "pseudonym_key_fingerprint"  # its entry naming the pseudonymisation key
MAX_CATEGORIES = 10  # a label with at most this many distinct values is categorical (merge checks its coding, describe counts each)
_SHOWN = 5  # how many offending rows an error message lists


class ManifestError(ValueError):
    """A manifest is malformed or inconsistent; the message names the file and the fix."""


def label_columns(table: pd.DataFrame) -> list[str]:
    """Label columns of a manifest: every column except ``subject_id``, ``image``, ``cohort``, ``status``."""
    return [c for c in table.columns if c not in RESERVED_COLUMNS]


def _first(values: Collection, total: int | None = None) -> str:
    values = list(values)
    total = len(values) if total is None else total
    shown = ", ".join(str(v) for v in values[:_SHOWN])
    return f"{shown}, … ({total} in all)" if total > _SHOWN else shown


def _lines(index: pd.Index) -> str:
    """CSV lines of manifest rows: the header is line 1, so row ``i`` of :func:`read_manifest` is line ``i + 2``."""
    return ("line " if len(index) == 1 else "lines ") + _first([i + 2 for i in index])


def _wider_rows(path: Path) -> list[int]:
    """CSV lines (the header is line 1) whose rows have more fields than the header."""
    with path.open(newline="", encoding="utf-8") as stream:
        reader = csv.reader(stream)
        width = len(next(reader))
        return [reader.line_num for row in reader if len(row) > width]


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV, check its columns and return it with absolute ``image`` paths.

    Raises
    ------
    ManifestError
        If the file is missing, lacks a required column, or has a row without an image path.

    The rows keep the index ``0, 1, ...`` of the file's order, by which errors name their CSV lines.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist; make it with `mimm-med preprocess` or `cohort merge`")
    try:
        table = pd.read_csv(path, dtype={SUBJECT: str, IMAGE: str, COHORT: str, STATUS: str})
    except UnicodeDecodeError:
        raise ManifestError(f"manifest {path} is not UTF-8 text; write manifests with `mimm-med preprocess` or `cohort merge`") from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as error:
        raise ManifestError(
            f"manifest {path} cannot be read as CSV ({error}); re-run `mimm-med preprocess` or `cohort merge`, which write it"
        ) from None
    if not isinstance(table.index, pd.RangeIndex):
        # pandas takes the first column as row names when the first row has a field more than the header
        # (a trailing comma, a value added by hand): every column would be read as the one after it
        wider = pd.Index(_wider_rows(path)) - 2  # row numbers, as _lines takes them
        raise ManifestError(
            f"manifest {path}: {_lines(wider)} of the CSV {'has' if len(wider) == 1 else 'have'} more fields than its "
            f"header's {len(table.columns)} ({', '.join(table.columns)}); remove the extra fields (a trailing comma) "
            "or name their column in the header"
        )
    missing = [c for c in RESERVED_COLUMNS if c not in table.columns]
    if missing:
        raise ManifestError(
            f"manifest {path} lacks columns {missing} (it has {list(table.columns)}); "
            "write manifests with `mimm-med preprocess` or `mimm-med cohort merge`"
        )
    unknown_status = table[SUBJECT][~table[STATUS].isin((STATUS_OK, STATUS_FAILED))]
    if len(unknown_status):
        raise ManifestError(
            f"manifest {path}: status must be {STATUS_OK!r} or {STATUS_FAILED!r}, but {len(unknown_status)} rows "
            f"(subjects {_first(unknown_status)}) hold {sorted(set(map(str, table[STATUS][unknown_status.index])))}; "
            f"({_lines(unknown_status.index)}); re-run preprocess, which writes it, or fix those rows"
        )
    blank = table.index[table[IMAGE].isna()]
    if len(blank):
        raise ManifestError(
            f"manifest {path}: image is blank in {len(blank)} rows ({_lines(blank)}); re-run `mimm-med preprocess` "
            "or `cohort merge`, which write every row's image, or drop those rows"
        )
    folder = os.path.abspath(path.parent)
    table[IMAGE] = [os.path.normpath(os.path.join(folder, p)) for p in table[IMAGE]]
    return table


def write_manifest(table: pd.DataFrame, path: str | Path) -> Path:
    """Write ``table`` (absolute ``image`` paths) atomically to ``path`` with paths relative to its folder."""
    path = Path(path)
    folder = os.path.abspath(path.parent)
    out = table.copy()
    out[IMAGE] = [Path(os.path.relpath(p, folder)).as_posix() for p in out[IMAGE]]
    out = out[[SUBJECT, IMAGE, *label_columns(out), COHORT, STATUS]]
    with atomic_output(path) as tmp:
        out.to_csv(tmp, index=False)
    return path


def validate_manifest(
    table: pd.DataFrame,
    path: str | Path,
    label_values: Mapping[str, Collection | None] | None = None,
    check_files: bool = True,
) -> None:
    """Check a manifest read by :func:`read_manifest`.

    Parameters
    ----------
    table
        The manifest, ``image`` holding absolute paths.
    path
        Its file, named in error messages.
    label_values
        Label column → allowed values (``None``: any value). Every key must be a column.
    check_files
        Check that every ``ok`` image exists.

    Rows are named by their CSV line, taken from ``table``'s index as :func:`read_manifest` numbers it.

    Raises
    ------
    ManifestError
        On duplicate images, missing subject ids, missing or out-of-range labels, or missing files.
    """
    duplicated = table[IMAGE][table[IMAGE].duplicated()]
    if len(duplicated):
        raise ManifestError(
            f"manifest {path} lists {len(duplicated)} images more than once ({_first(duplicated)}; again at "
            f"{_lines(duplicated.index)}); "
            "re-run preprocess or `cohort merge`, which write each image once"
        )
    if table[SUBJECT].isna().any():
        blank = table.index[table[SUBJECT].isna()]
        raise ManifestError(
            f"manifest {path} has {len(blank)} rows without subject_id ({_lines(blank)}); re-run preprocess"
        )
    label_values = dict(label_values or {})
    absent = [name for name in label_values if name not in table.columns]
    if absent:
        raise ManifestError(
            f"manifest {path} lacks label columns {absent} (it has {label_columns(table)}); "
            "re-run preprocess with the cohort card that defines them"
        )
    # ``cohort`` is reserved but a bundle may use it as a label (the stand-in brain's second factor)
    checked = [*label_columns(table), *(name for name in label_values if name in RESERVED_COLUMNS)]
    for name in checked:
        missing = table[SUBJECT][table[name].isna()]
        if len(missing):
            raise ManifestError(
                f"manifest {path}: label {name!r} is missing in {len(missing)} rows (subjects {_first(missing)}; "
                f"{_lines(missing.index)}); "
                "fix the metadata table or the card's value mapping, or drop those rows"
            )
        allowed = label_values.get(name)
        if allowed is not None:
            spelled = {canonical_text(v) for v in allowed}
            outside = table[name][~table[name].map(canonical_text).isin(spelled)]
            if len(outside):
                raise ManifestError(
                    f"manifest {path}: label {name!r} has values {sorted(set(map(str, outside)))} outside "
                    f"{sorted(spelled)} in {len(outside)} rows ({_lines(outside.index)}); fix the card's value mapping "
                    "and re-run preprocess"
                )
    if check_files:
        ok = table[table[STATUS] == STATUS_OK]
        sizes = [file_size(p) for p in ok[IMAGE]]  # one stat per image: a cohort's manifest on a network file system
        absent_files = [p for p, size in zip(ok[IMAGE], sizes) if size is None]
        if absent_files and len(absent_files) == len(ok):
            # every image gone: the manifest (its paths relative to its folder) was moved, not the images lost
            raise ManifestError(
                f"none of the {len(ok)} images listed in manifest {path} exist ({_first(absent_files)}): its image "
                f"paths are relative to its folder; if the manifest was moved away from its images, move it back "
                "(or its folder with them), else re-run `mimm-med preprocess` with the same --out"
            )
        if absent_files:
            raise ManifestError(
                f"{len(absent_files)} of {len(ok)} images listed in manifest {path} are missing "
                f"({_first(absent_files)}); re-run `mimm-med preprocess` with the same --out to redo them"
            )
        empty_files = [p for p, size in zip(ok[IMAGE], sizes) if size == 0]
        if empty_files:  # no reader loads them; outside damage such as a partial copy
            raise ManifestError(
                f"{len(empty_files)} of {len(ok)} images listed in manifest {path} are empty files "
                f"({_first(empty_files)}); re-run `mimm-med preprocess` with the same --out to redo them"
            )


def file_size(path: str) -> int | None:
    """Size of the file at ``path`` in bytes; ``None`` where it cannot be found or read, as ``os.path.exists`` says."""
    try:
        return os.stat(path).st_size
    except (OSError, ValueError):
        return None


def load_manifest(
    path: str | Path,
    card: object | None = None,
    label_values: Mapping[str, Collection | None] | None = None,
    include_failed: bool = False,
) -> pd.DataFrame:
    """Read and validate a manifest; return its ``ok`` rows with absolute ``image`` paths.

    Parameters
    ----------
    path
        Manifest CSV.
    card
        A :class:`~mimm_med.data.cohort_card.CohortCard` whose label values the labels must take.
    label_values
        Label column → allowed values (``None``: any), instead of or on top of ``card``.
    include_failed
        Also return rows whose ``status`` is not ``ok`` (their images need not exist).

    Examples
    --------
    A manifest of two images, written as ``mimm-med preprocess`` writes one:

    >>> import tempfile
    >>> import numpy as np
    >>> from mimm_med.data.writers import ImageFileWriter
    >>> folder = Path(tempfile.mkdtemp())
    >>> writer = ImageFileWriter("nifti")
    >>> images = [writer(np.zeros((1, 4, 4, 4)), folder / "images" / f"img-{i}") for i in (1, 2)]
    >>> manifest = pd.DataFrame({"subject_id": ["sub-1", "sub-2"], "image": images, "sex": ["female", "male"],
    ...                          "cohort": "ukb", "status": "ok"})
    >>> print(write_manifest(manifest, folder / "manifest.csv").read_text(), end="")
    subject_id,image,sex,cohort,status
    sub-1,images/img-1.nii.gz,female,ukb,ok
    sub-2,images/img-2.nii.gz,male,ukb,ok
    >>> table = load_manifest(folder / "manifest.csv", label_values={"sex": ["female", "male"]})
    >>> table["image"].tolist() == [str(image) for image in images]  # absolute paths again
    True
    >>> load_manifest(folder / "manifest.csv", label_values={"sex": ["F", "M"]})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    mimm_med.data.manifest.ManifestError: manifest .../manifest.csv: label 'sex' has values ['female', 'male'] outside ['F', 'M'] in 2 rows (lines 2, 3); fix the card's value mapping and re-run preprocess
    """
    table = read_manifest(path)
    if not include_failed:
        table = table[table[STATUS] == STATUS_OK]
    allowed = dict(card.label_values) if card is not None else {}
    allowed.update(label_values or {})
    validate_manifest(table, path, allowed)  # before renumbering: its errors name the rows' lines
    return table.reset_index(drop=True)


def cannot_write(target: str | Path, error: OSError) -> str:
    """One line for an output that cannot be written: what, why and the fix."""
    if isinstance(error, (FileExistsError, NotADirectoryError)) and error.filename is not None:
        # a file where the path needs a folder: the path itself or one of its parents
        blocker = next((path for path in (Path(error.filename), *Path(error.filename).parents) if path.exists()), None)
        if blocker is not None and not blocker.is_dir():
            return f"cannot write {target}: {blocker} is a file, not a folder; choose another folder"
    reason = error.strerror or str(error)
    if error.filename is not None:
        reason = f"{reason} ({error.filename})"
    return f"cannot write {target}: {reason}; choose a writable folder with free space"


def recorded_key_fingerprint(manifest: str | Path) -> tuple[Path, str | None]:
    """The ``pipeline.json`` beside ``manifest`` and the key fingerprint it records (``None``: not known)."""
    record = Path(manifest).parent / PIPELINE_RECORD
    if not record.is_file():
        return record, None
    return record, json.loads(record.read_text(encoding="utf-8")).get(KEY_FINGERPRINT)


def _check_keys(paths: Sequence[str | Path], tables: Sequence[pd.DataFrame]) -> None:
    known = [(path, *recorded_key_fingerprint(path), set(table[COHORT])) for path, table in zip(paths, tables)]
    for (a, record_a, key_a, cohorts_a), (b, record_b, key_b, cohorts_b) in itertools.combinations(known, 2):
        shared = sorted(cohorts_a & cohorts_b)
        if key_a and key_b and key_a != key_b and shared:
            raise ManifestError(
                f"{a} and {b} both hold cohort {shared[0]!r} but were pseudonymised with different keys (the key "
                f"fingerprints in {record_a} and {record_b} differ), so a subject would appear under two subject ids; "
                "re-run `mimm-med preprocess` for one of them with the other's --key-file into a new --out"
            )


def _check_pipelines(paths: Sequence[str | Path]) -> None:
    """Refuse manifests whose folders' ``pipeline.json`` record other preprocessing settings (spacing, size, ...).

    Images of other voxel sizes or grids in one manifest would not batch together, or, at one grid
    size, would make the cohort a shortcut the network can read off the voxel size.
    """
    known = []
    for path in paths:
        record = Path(path).parent / PIPELINE_RECORD
        if record.is_file() and record not in (seen for _, seen, _ in known):
            settings = json.loads(record.read_text(encoding="utf-8"))
            # the key may differ between cohorts (see _check_keys); the description is free text
            known.append((path, record, {k: v for k, v in settings.items() if k not in (KEY_FINGERPRINT, "description")}))
    for (a, record_a, settings_a), (b, record_b, settings_b) in itertools.combinations(known, 2):
        differ = sorted(key for key in settings_a.keys() | settings_b.keys() if settings_a.get(key) != settings_b.get(key))
        if differ:
            shown = "; ".join(f"{key}: {settings_a.get(key)!r} in {record_a}, {settings_b.get(key)!r} in {record_b}"
                              for key in differ if key != "preprocessing")  # fmt: skip
            raise ManifestError(
                f"{a} and {b} were preprocessed with other pipeline settings ({', '.join(differ)} differ"
                f"{': ' + shown if shown else ''}), so their images differ in voxel size or grid; re-run "
                "`mimm-med preprocess` for one of them with the other's settings (--set) into a new --out"
            )


def _fold(value: str) -> str:
    return re.sub(r"[\W_]", "", value.casefold())


def _spelling_clash(values: Collection[str]) -> tuple[str, str] | None:
    """Two values that look like one spelt two ways: equal but for case and punctuation, or one abbreviated."""
    for a, b in itertools.permutations(sorted(values), 2):
        if _fold(a) == _fold(b) or (_fold(a).isalpha() and _fold(b).startswith(_fold(a))):
            return a, b
    return None


def _check_codings(paths: Sequence[str | Path], tables: Sequence[pd.DataFrame]) -> None:
    filled = [(path, table) for path, table in zip(paths, tables) if len(table)]  # an empty shard has no coding
    for name in label_columns(tables[0]):
        numeric = {pd.api.types.is_numeric_dtype(table[name]) for _, table in filled}
        values = [(path, set(map(canonical_text, table[name]))) for path, table in filled]
        union = set().union(*(v for _, v in values))
        clash = _spelling_clash(union) if numeric == {False} and len(union) <= MAX_CATEGORIES else None
        if len(numeric) == 2:
            why = "numbers in some manifests, text in others"
        elif clash:
            why = f"{clash[0]!r} and {clash[1]!r} look like one value spelt two ways"
        else:
            continue
        shown = "; ".join(f"{path} has [{_first(sorted(v))}]" for path, v in values)
        raise ManifestError(
            f"label {name!r} looks coded differently ({why}): {shown}; map it to the same values in every "
            f"cohort card (labels.{name}.values) and re-run `mimm-med preprocess`"
        )


def merge_manifests(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate manifests (absolute ``image`` paths), e.g. UK Biobank and NAKO, or the shards of one run.

    Each manifest is validated (:func:`validate_manifest`, its ``ok`` images must exist). Manifests
    that share a cohort must have been pseudonymised with the same key, where their folders'
    ``pipeline.json`` record it: else one subject has two ids. Cohorts of their own may use
    keys of their own (the cohort is hashed into every pseudonym, so they cannot collide). Where
    two ``pipeline.json`` record the preprocessing settings, they must agree (spacing, grid size, ...).

    A label coded differently in two cohorts (``F``/``M`` and ``female``/``male``) is refused. Value
    sets may legitimately differ (a one-sex cohort, sites of their own), so only what looks like a
    coding clash is: a label that is numbers in one manifest and text in another, or a text label with
    at most ``MAX_CATEGORIES`` values holding two that differ only in case and punctuation or of which
    one is a prefix of the other (an abbreviation).

    Raises
    ------
    ManifestError
        If a manifest is invalid, their label columns, codings or pipeline settings differ, keys
        differ, or an image appears twice.
    """
    if not paths:
        raise ManifestError("give at least one manifest to merge")
    tables = [read_manifest(p) for p in paths]
    for path, table in zip(paths, tables):
        validate_manifest(table, path)
    reference = set(label_columns(tables[0]))
    for path, table in zip(paths[1:], tables[1:]):
        if set(label_columns(table)) != reference:
            raise ManifestError(
                f"label columns differ: {path} has {sorted(label_columns(table))}, {paths[0]} has "
                f"{sorted(reference)}; preprocess both with cards that map to the same label names"
            )
    _check_keys(paths, tables)
    _check_pipelines(paths)
    _check_codings(paths, tables)
    merged = pd.concat(tables, ignore_index=True)
    duplicated = merged[IMAGE][merged[IMAGE].duplicated()]
    if len(duplicated):
        raise ManifestError(
            f"{len(duplicated)} images appear in more than one of {[str(p) for p in paths]} ({_first(duplicated)}); "
            "merge each manifest once, and a run's shard parts without the run's merged manifest"
        )
    return merged


def validate_splits(splits: Mapping[str, pd.DataFrame], subject_column: str = SUBJECT) -> None:
    """Raise :class:`ManifestError` if a subject appears in two splits.

    The test sets (names starting with ``test-``) may share subjects with each other: they are
    held-out subjects drawn under different correlations and scored separately.

    Examples
    --------
    >>> train = pd.DataFrame({"subject_id": ["sub-1", "sub-2"]})
    >>> test = pd.DataFrame({"subject_id": ["sub-2", "sub-3"]})
    >>> validate_splits({"test-iid": test, "test-inverted": test})  # test sets may share subjects
    >>> validate_splits({"train": train, "test-iid": test})
    Traceback (most recent call last):
    ...
    mimm_med.data.manifest.ManifestError: splits 'train' and 'test-iid' share 1 subject (sub-2): images of one subject in two splits leak the test set into training; split by subject with `mimm-med cohort split`
    """
    subjects = {name: set(frame[subject_column]) for name, frame in splits.items()}
    for (a, sa), (b, sb) in itertools.combinations(subjects.items(), 2):
        if a.startswith("test-") and b.startswith("test-"):
            continue
        shared = sorted(sa & sb)
        if shared:
            raise ManifestError(
                f"splits {a!r} and {b!r} share {len(shared)} subject{'s' if len(shared) > 1 else ''} ({_first(shared)}): images of one subject "
                "in two splits leak the test set into training; split by subject with `mimm-med cohort split`"
            )
