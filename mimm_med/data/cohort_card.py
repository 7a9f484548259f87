"""Cohort cards: a YAML file per cohort that maps its raw layout and metadata onto mimm-med labels.

A user adds a cohort by writing a card, not code. The card says where the images are, which
metadata table(s) describe them, which column holds the subject id, and how columns become labels
(value mappings, bins, policies for uncertain and blank findings). :meth:`CohortCard.index` turns a
raw folder into records (one row per usable image) and problems (one row per unusable metadata row
with its reason), so that one bad row never loses the others. ``cohorts/README.md`` documents the
card keys.

Examples
--------
Index a stand-in of four UK Biobank subjects, written in the real cohort's layout:

>>> import tempfile
>>> from mimm_med.data.standins import generate_cohort
>>> raw = generate_cohort("ukb", n=4, out=Path(tempfile.mkdtemp()) / "ukb", resolution_mm=6, progress=False)
>>> card = CohortCard.from_yaml("cohorts/ukb.yaml")
>>> records, problems = card.index(raw)  # card.scan also finds images no row names
>>> records.columns.tolist()
['source_id', 'image', 'sex', 'age', 'age_group', 'site', 'cohort']
>>> records.drop(columns="image")
  source_id     sex   age age_group     site cohort
0   3940038    male  56.0     young  reading    ukb
1   3029718  female  57.0     young  bristol    ukb
2   1534316    male  71.0       old  reading    ukb
3   2754248  female  66.0       old  bristol    ukb
>>> len(problems)
0
"""

from __future__ import annotations

import csv
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pandas as pd
import yaml

from mimm_med.data.manifest import STATUS, SUBJECT
from mimm_med.data.pseudonym import canonical_text

#: The cohort cards of the source checkout mimm-med is installed from (``cohorts/``), wherever it runs.
SHIPPED_CARDS = Path(__file__).resolve().parents[2] / "cohorts"
SOURCE_ID = "source_id"
IMAGE = "image"
COHORT = "cohort"
REASON = "reason"
ROW = "row"  # of problems: where the row is, "ukb_phenotypes.csv, line 12"
MODALITIES: tuple[str, ...] = ("brain_t1", "chest_xray", "digits")
_FIELD = re.compile(r"\{([^{}]+)\}")


class CardError(ValueError):
    """A cohort card (or the raw folder it describes) that cannot be used; the message names the file and key."""


def _canonical(value: Any) -> str:
    """Spelling-independent text of a table cell or card value: ``1``, ``"1"`` and ``"1.0"`` all give ``"1"``."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    if not np.isfinite(number):
        return text
    return str(int(number)) if number.is_integer() else repr(number)


class _Where:
    """Names a place in a card for error messages: ``cohorts/ukb.yaml: labels.sex.values``."""

    def __init__(self, card: Path, key: str = "") -> None:
        self.card, self.key = card, key

    def __truediv__(self, key: str) -> _Where:
        return _Where(self.card, f"{self.key}.{key}" if self.key else key)

    def error(self, message: str) -> CardError:
        return CardError(f"{self.card}: {self.key}: {message}" if self.key else f"{self.card}: {message}")


def _require(spec: Mapping, key: str, where: _Where, kind: type | tuple[type, ...] = str) -> Any:
    if key not in spec:
        raise (where / key).error("missing; this key is required (see cohorts/README.md)")
    return _check_type(spec[key], where / key, kind)


def _check_type(value: Any, where: _Where, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise where.error(f"expected {names}, got {type(value).__name__} {value!r}")
    return value


def _check_keys(spec: Mapping, allowed: Sequence[str], where: _Where) -> None:
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise where.error(f"unknown key(s) {unknown}; allowed here: {list(allowed)}")


class Label(ABC):
    """One label of a card: how a metadata column becomes a label value.

    Subclasses register under the card's ``type`` name and implement :meth:`apply`.
    """

    kinds: ClassVar[dict[str, type[Label]]] = {}
    type_name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]] = ("type", "column", "description")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Label.kinds[cls.type_name] = cls

    def __init__(self, name: str, spec: Mapping, where: _Where, needs_column: bool = True) -> None:
        _check_keys(spec, self.keys, where)
        self.name = name
        self.description = str(spec.get("description", ""))
        self.column: str | None = _require(spec, "column", where) if needs_column and "column" in self.keys else None

    @classmethod
    def from_spec(cls, name: str, spec: Any, where: _Where, needs_column: bool = True) -> Label:
        """Build the label class named by ``spec["type"]``."""
        spec = _check_type(spec, where, dict)
        kind = _require(spec, "type", where)
        if kind not in cls.kinds:
            raise (where / "type").error(f"unknown label type {kind!r}; choose one of {sorted(cls.kinds)}")
        return cls.kinds[kind](name, spec, where, needs_column)

    @property
    @abstractmethod
    def values(self) -> list | None:
        """The values this label can take (``None``: any number)."""

    @property
    def dtype(self) -> str:
        """pandas dtype of the label column in the records."""
        return "object"

    @abstractmethod
    def apply(self, cells: pd.Series) -> tuple[list, list[str | None]]:
        """Map raw table ``cells`` to (label values, per-row reason the row is unusable or ``None``)."""

    def _blank(self, policy: Any) -> tuple[Any, str | None]:
        if policy is None:
            return None, f"{self.name}: column {self.column!r} is blank"
        return policy, None


class CategoricalLabel(Label):
    """Raw values mapped to names by ``values`` (``{1: male, 0: female}``); other values are problems.

    ``missing`` gives the value of blank cells; without it, blank rows are problems.
    """

    type_name = "categorical"
    keys = Label.keys + ("values", "missing")

    def __init__(self, name: str, spec: Mapping, where: _Where, needs_column: bool = True) -> None:
        super().__init__(name, spec, where, needs_column)
        mapping = _require(spec, "values", where, (dict, list))
        if isinstance(mapping, list):  # documentation-only form used by generated cohorts
            mapping = {value: value for value in mapping}
        if not mapping:
            raise (where / "values").error("empty; list the raw values and the label each maps to")
        self.mapping = {_canonical(raw): mapped for raw, mapped in mapping.items()}
        self.missing = spec.get("missing")

    @property
    def values(self) -> list:
        labels = list(dict.fromkeys(self.mapping.values()))
        return labels + ([self.missing] if self.missing is not None and self.missing not in labels else [])

    def apply(self, cells: pd.Series) -> tuple[list, list[str | None]]:
        out, reasons = [], []
        for cell in cells:
            key = _canonical(cell)
            if key == "":
                value, reason = self._blank(self.missing)
            elif key in self.mapping:
                value, reason = self.mapping[key], None
            else:
                value = None
                reason = (
                    f"{self.name}: value {cell!r} in column {self.column!r} "
                    f"is not one of the card's values {list(self.mapping)}"
                )
            out.append(value)
            reasons.append(reason)
        return out, reasons


class ContinuousLabel(Label):
    """A number (``age``), optionally checked against ``range: [low, high]``.

    With ``bins: {edges: [60], names: [young, old]}`` the label is the name of the bin instead
    (``young`` below 60, ``old`` from 60 on: bins are closed on the left).
    """

    type_name = "continuous"
    keys = Label.keys + ("range", "bins", "missing")

    def __init__(self, name: str, spec: Mapping, where: _Where, needs_column: bool = True) -> None:
        super().__init__(name, spec, where, needs_column)
        self.range: tuple[float, float] | None = None
        if "range" in spec:
            bounds = _check_type(spec["range"], where / "range", list)
            if len(bounds) != 2 or not all(isinstance(b, (int, float)) for b in bounds) or bounds[0] > bounds[1]:
                raise (where / "range").error(f"expected [low, high] numbers with low <= high, got {bounds!r}")
            self.range = (float(bounds[0]), float(bounds[1]))
        self.edges: list[float] | None = None
        self.names: list[str] = []
        if "bins" in spec:
            bins = _check_type(spec["bins"], where / "bins", dict)
            _check_keys(bins, ("edges", "names"), where / "bins")
            edges = _require(bins, "edges", where / "bins", list)
            names = _require(bins, "names", where / "bins", list)
            if not all(isinstance(e, (int, float)) for e in edges) or list(edges) != sorted(set(edges)):
                raise (where / "bins" / "edges").error(f"expected strictly increasing numbers, got {edges!r}")
            if len(names) != len(edges) + 1:
                raise (where / "bins" / "names").error(
                    f"{len(edges)} edges make {len(edges) + 1} bins, but {len(names)} names are given: {names!r}"
                )
            self.edges, self.names = [float(e) for e in edges], [str(n) for n in names]
        self.missing = spec.get("missing")

    @property
    def values(self) -> list | None:
        return self.names if self.edges is not None else None

    @property
    def dtype(self) -> str:
        return "object" if self.edges is not None else "float"

    def apply(self, cells: pd.Series) -> tuple[list, list[str | None]]:
        out, reasons = [], []
        for cell in cells:
            if str(cell).strip() == "":
                value, reason = self._blank(self.missing)  # the fill value is a label value already
            else:
                value, reason = self._number(cell)
                if reason is None and self.edges is not None:
                    value = self.names[int(np.searchsorted(self.edges, value, side="right"))]
            out.append(value)
            reasons.append(reason)
        return out, reasons

    def _number(self, cell: Any) -> tuple[float | None, str | None]:
        try:
            value = float(str(cell).strip())
        except ValueError:
            return None, f"{self.name}: {cell!r} in column {self.column!r} is not a number"
        if not np.isfinite(value):
            return None, f"{self.name}: {cell!r} in column {self.column!r} is not a finite number"
        if self.range is not None and not self.range[0] <= value <= self.range[1]:
            bounds = list(self.range)
            return None, f"{self.name}: {value:g} in column {self.column!r} is outside the card's range {bounds}"
        return value, None


class FindingLabel(Label):
    """A binary finding reported as 1.0 / 0.0 / -1.0 (uncertain) / blank, as CheXpert labels are.

    ``uncertain``: ``u_ones`` (count as 1), ``u_zeros`` (count as 0) or ``drop`` (default: the row
    is a problem). ``blank``: ``zero`` (default: not mentioned counts as absent) or ``drop``.
    """

    type_name = "finding"
    keys = Label.keys + ("uncertain", "blank")
    UNCERTAIN: ClassVar[dict[str, int | None]] = {"u_ones": 1, "u_zeros": 0, "drop": None}
    BLANK: ClassVar[dict[str, int | None]] = {"zero": 0, "drop": None}

    def __init__(self, name: str, spec: Mapping, where: _Where, needs_column: bool = True) -> None:
        super().__init__(name, spec, where, needs_column)
        self.uncertain = str(spec.get("uncertain", "drop"))
        self.blank = str(spec.get("blank", "zero"))
        if self.uncertain not in self.UNCERTAIN:
            raise (where / "uncertain").error(
                f"unknown policy {self.uncertain!r}; choose one of {list(self.UNCERTAIN)}"
            )
        if self.blank not in self.BLANK:
            raise (where / "blank").error(f"unknown policy {self.blank!r}; choose one of {list(self.BLANK)}")

    @property
    def values(self) -> list:
        return [0, 1]

    @property
    def dtype(self) -> str:
        return "int64"

    def apply(self, cells: pd.Series) -> tuple[list, list[str | None]]:
        out, reasons = [], []
        for cell in cells:
            key = _canonical(cell)
            value, reason = None, None
            if key in ("0", "1"):
                value = int(key)
            elif key == "-1":
                value = self.UNCERTAIN[self.uncertain]
                if value is None:
                    reason = (
                        f"{self.name}: uncertain (-1.0) in column {self.column!r}; the card's policy is uncertain: drop"
                    )
            elif key == "":
                value = self.BLANK[self.blank]
                if value is None:
                    reason = f"{self.name}: column {self.column!r} is blank; the card's policy is blank: drop"
            else:
                reason = (
                    f"{self.name}: {cell!r} in column {self.column!r} is not a finding value (1.0, 0.0, -1.0 or blank)"
                )
            out.append(value)
            reasons.append(reason)
        return out, reasons


class ConstantLabel(Label):
    """The same ``value`` for every image, e.g. the cohort of a single-cohort table."""

    type_name = "constant"
    keys = ("type", "value", "description")

    def __init__(self, name: str, spec: Mapping, where: _Where, needs_column: bool = True) -> None:
        super().__init__(name, spec, where, needs_column=False)
        self.value = _require(spec, "value", where, (str, int, float, bool))

    @property
    def values(self) -> list:
        return [self.value]

    def apply(self, cells: pd.Series) -> tuple[list, list[str | None]]:
        return [self.value] * len(cells), [None] * len(cells)


@dataclass(frozen=True)
class Images:
    """Where a metadata row's image is: a ``pattern`` over table columns, or a table ``column``.

    ``pattern`` fields name columns: ``"{eid}_20252_2_0/T1/T1.nii.gz"``. A ``column`` holds the path,
    with ``strip_prefix`` removed first (``CheXpert-v1.0-small/``); paths are relative to the raw folder.
    """

    pattern: str | None
    column: str | None
    strip_prefix: str

    @classmethod
    def from_spec(cls, spec: Any, where: _Where) -> Images:
        spec = _check_type(spec, where, dict)
        _check_keys(spec, ("pattern", "column", "strip_prefix"), where)
        if ("pattern" in spec) == ("column" in spec):
            raise where.error("give exactly one of 'pattern' (a path with {column} fields) or 'column' (a path column)")
        if "pattern" in spec and not _FIELD.search(_check_type(spec["pattern"], where / "pattern", str)):
            raise (where / "pattern").error(
                f"{spec['pattern']!r} has no {{column}} field: every row would name the same image"
            )
        if "strip_prefix" in spec and "column" not in spec:
            raise (where / "strip_prefix").error("only applies with 'column'")
        return cls(spec.get("pattern"), spec.get("column"), str(spec.get("strip_prefix", "")))

    @property
    def columns(self) -> list[str]:
        """Table columns the image paths are made from."""
        return _FIELD.findall(self.pattern) if self.pattern else [self.column]

    def relative_paths(self, table: pd.DataFrame) -> tuple[list[str | None], list[str | None]]:
        """Per row: (path relative to the raw folder or ``None``, reason it has none or ``None``)."""
        cells = {column: [canonical_text(c) for c in table[column]] for column in self.columns}
        paths, reasons = [], []
        for row in range(len(table)):
            path, reason = (
                self._pattern_path(cells, row) if self.pattern else self._column_path(cells[self.column][row])
            )
            paths.append(path)
            reasons.append(reason)
        return paths, reasons

    def _pattern_path(self, cells: Mapping[str, list[str]], row: int) -> tuple[str | None, str | None]:
        blank = [column for column in self.columns if not cells[column][row]]
        if blank:
            return None, f"image path: column(s) {blank} blank, needed by pattern {self.pattern!r}"
        return _FIELD.sub(lambda field: cells[field.group(1)][row], self.pattern), None

    def _column_path(self, value: str) -> tuple[str | None, str | None]:
        if not value:
            return None, f"image path: column {self.column!r} is blank"
        if not value.startswith(self.strip_prefix):
            return None, f"image path {value!r} in column {self.column!r} does not start with {self.strip_prefix!r}"
        return value[len(self.strip_prefix) :], None


def _missing_image(path: str, image: Path) -> str:
    """The problem of a row whose image ``path`` (absolute: ``image``) is missing.

    A folder of mixed ``.nii`` and ``.nii.gz`` files is common, and one pattern matches only one of them.
    """
    other = image.with_name(image.name[: -len(".gz")] if image.name.endswith(".gz") else f"{image.name}.gz")
    if not other.exists():
        return f"image file missing: {path}"
    return (
        f"image file missing: {path} ({other.name} is there; images.pattern names one file per row: (un)compress "
        "the files that differ, or name each row's file in a table column given as images.column)"
    )


def _is_blank(record: list[str]) -> bool:
    return not record or (len(record) == 1 and not record[0].strip())


def _absent_columns(
    path: Path, absent: Sequence[str], header: Sequence[str], card: Path, uses: Mapping[str, Sequence[str]]
) -> CardError:
    """The error for a table without columns the card uses: which card keys use them, and the likely fix."""
    named = ", ".join(f"{column!r} ({', '.join(uses.get(column, ()))})" if uses.get(column) else repr(column)
                      for column in absent)
    hints = []
    if len(header) == 1 and any(sep in header[0] for sep in ";\t|"):
        hints.append("the header is one field: is the table separated by ';' or tabs? save it comma-separated")
    folded = {_fold_name(h): h for h in header}
    near = {column: folded[_fold_name(column)] for column in absent if _fold_name(column) in folded}
    hints += [f"{column!r} is spelt {found!r} in the table" for column, found in near.items()]
    present = set(header)
    rap = {column: found for column in absent for found in _rap_spellings(column) if found in present}
    hints += [f"{column!r} is {found!r} in the table, UK Biobank's Research Analysis Platform naming: give "
              f"{found!r} in the card's key" for column, found in rap.items()]  # fmt: skip
    hints.append("name the table's column in the card's key, or export the column into the table")
    return CardError(
        f"{card}: table {path} lacks column(s) {list(absent)} that the card uses: {named}; it has {list(header)}; "
        + "; ".join(hints)
    )


def _rap_spellings(column: str) -> list[str]:
    """The names UK Biobank's Research Analysis Platform gives the showcase column ``column`` (``21003-2.0``).

    The platform exports field 21003, instance 2, array index 0 as ``p21003_i2`` (``p31`` for a field
    of one instance, ``_a0`` appended for fields with arrays); other names have none.

    Examples
    --------
    >>> _rap_spellings("21003-2.0")
    ['p21003_i2', 'p21003_i2_a0']
    >>> _rap_spellings("31-0.0")
    ['p31_i0', 'p31_i0_a0', 'p31', 'p31_a0']
    """
    match = re.fullmatch(r"(\d+)-(\d+)\.(\d+)", column.strip())
    if not match:
        return []
    field, instance, index = match.groups()
    spellings = [f"p{field}_i{instance}", f"p{field}_i{instance}_a{index}"]
    return spellings + ([f"p{field}", f"p{field}_a{index}"] if instance == "0" else [])


def _fold_name(name: str) -> str:
    return " ".join(name.split()).casefold()


class _Lines:
    """Lines for :func:`csv.reader` that keeps those of the record being read (``taken``) and says when none
    were left (``ended``): a record returned after that ran to the end of the file inside a quoted field."""

    def __init__(self, lines: Iterator[str]) -> None:
        self.lines, self.taken, self.ended = lines, [], False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        try:
            line = next(self.lines)
        except StopIteration:
            self.ended = True
            raise
        self.taken.append(line)
        return line


def _csv_records(lines: Iterator[str]) -> Iterator[tuple[int, list[str] | None]]:
    """The CSV records of ``lines``, each with the line it starts on; ``None`` for a record whose quote never closes.

    A field that opens a quote (``"note``) and never closes it would take every later line as its text, so
    their rows would vanish without a word: that record is ``None``, and the lines after its first are read
    again. Raises :class:`csv.Error` with the line of the record at fault.
    """
    first, source = 1, lines
    while True:
        feed = _Lines(source)
        reader = csv.reader(feed)
        try:
            for record in reader:
                taken, feed.taken = feed.taken, []
                if feed.ended:
                    yield first, None
                    first, source = first + 1, iter(taken[1:])
                    break
                yield first, record
                first += len(taken)
            else:
                return
        except csv.Error as error:
            raise csv.Error(f"line {first}: {error}") from None


_FIELD_LIMIT = 2**31 - 1  # csv's default (128 KiB) refuses long free-text fields, such as reports
_UNCLOSED_QUOTE = (
    'unreadable row: it opens a quote (") that no later line closes; close or remove it '
    "(the lines after it are read as rows of their own)"
)


def _read_table(
    path: Path, name: str, columns: Sequence[str], card: Path, uses: Mapping[str, Sequence[str]] | None = None
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The ``columns`` of a metadata table as text cells, indexed by each row's place (``"name, line 12"``);
    and ``(place, problem)`` of every line that has more fields than the header or opens a quote it never
    closes. ``uses`` (column -> the
    card keys that name it) makes the error for a missing column say where the card names it.

    Read with the csv module, not pandas: pandas says neither which line a row came from nor, past a
    quoted line break, which line it skipped. A line that opens a quote it never closes is unreadable,
    and the lines after it are read as rows.
    """
    limit = csv.field_size_limit(_FIELD_LIMIT)
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            records = _csv_records(file)
            _, header = next(records, (1, []))
            if header is None:
                raise CardError(
                    f"{card}: metadata.tables: {path}: the header row (line 1) opens a quote (\") that no later "
                    "line closes; close or remove it"
                )
            if _is_blank(header):
                raise CardError(
                    f"{card}: metadata.tables: {path} is empty (no header row); check the file, e.g. a copy cut short"
                )
            absent = [c for c in columns if c not in header]
            if absent:
                raise _absent_columns(path, absent, header, card, uses or {})
            take = [header.index(c) for c in columns]
            rows, places, unreadable = [], [], []
            for first_line, record in records:
                place = f"{name}, line {first_line}"
                if record is None:
                    unreadable.append((place, _UNCLOSED_QUOTE))
                    continue
                if _is_blank(record):
                    continue
                if len(record) > len(header):
                    unreadable.append((place, f"unreadable row: expected {len(header)} fields, saw {len(record)}"))
                    continue
                record += [""] * (len(header) - len(record))  # a short row's missing fields are blank, as in pandas
                rows.append([record[i] for i in take])
                places.append(place)
    except UnicodeDecodeError as error:
        raise CardError(
            f"{card}: metadata.tables: {path} is not UTF-8 text ({error.reason} at byte {error.start}); "
            "save it as a UTF-8 CSV (in Excel: CSV UTF-8; or `iconv -f UTF-16 -t UTF-8`)"
        ) from None
    except csv.Error as error:
        raise CardError(
            f"{card}: metadata.tables: {path} cannot be read as CSV ({error}); check the file"
        ) from None
    finally:
        csv.field_size_limit(limit)
    if not rows and not unreadable:
        raise CardError(
            f"{card}: metadata.tables: {path} has a header row but no data rows; check the file, e.g. an export "
            "cut short or the wrong table"
        )
    return pd.DataFrame(rows, columns=list(columns), index=places, dtype=str), unreadable


@dataclass(frozen=True)
class Metadata:
    """The metadata table(s), the subject id column and the row filter of a card.

    ``subject`` is a column name, or ``{column: Path, regex: "(patient\\d+)"}`` to take the id out of
    a column (the first regex group). ``filter`` keeps rows whose column has one of the given values.
    """

    tables: tuple[str, ...]
    subject_column: str
    subject_regex: re.Pattern | None
    filter: Mapping[str, tuple[str, ...]]

    @classmethod
    def from_spec(cls, spec: Any, where: _Where) -> Metadata:
        spec = _check_type(spec, where, dict)
        _check_keys(spec, ("tables", "subject", "filter"), where)
        tables = _require(spec, "tables", where, (str, list))
        tables = (tables,) if isinstance(tables, str) else tuple(_check_type(t, where / "tables", str) for t in tables)
        if not tables:
            raise (where / "tables").error("empty; name at least one table file")
        subject = _require(spec, "subject", where, (str, dict))
        regex = None
        if isinstance(subject, dict):
            _check_keys(subject, ("column", "regex"), where / "subject")
            pattern = _require(subject, "regex", where / "subject")
            try:
                regex = re.compile(pattern)
            except re.error as error:
                raise (where / "subject" / "regex").error(f"invalid regular expression {pattern!r}: {error}") from None
            if regex.groups < 1:
                raise (where / "subject" / "regex").error(f"{pattern!r} needs a (group) around the id")
            subject = _require(subject, "column", where / "subject")
        filters = _check_type(spec.get("filter", {}), where / "filter", dict)
        allowed = {
            str(column): tuple(_canonical(v) for v in (values if isinstance(values, list) else [values]))
            for column, values in filters.items()
        }
        return cls(tables, subject, regex, allowed)

    def read(
        self, raw_dir: Path, columns: Sequence[str], card: Path, uses: Mapping[str, Sequence[str]] | None = None
    ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
        """Concatenate the tables, unfiltered (text cells, blanks as ``""``, indexed by each row's place,
        ``"ukb_phenotypes.csv, line 12"``); and ``(place, problem)`` of every unreadable line. ``uses``:
        column -> the card keys that name it, for the error about a missing column."""
        frames, unreadable = [], []
        columns = list(dict.fromkeys(columns))  # two labels may share a column
        for name in self.tables:
            path = raw_dir / name
            if not path.is_file():
                raise CardError(
                    f"{card}: metadata.tables: {path} not found; is {raw_dir} the raw folder of this cohort?"
                )
            frame, lines = _read_table(path, name, columns, card, uses)
            frames.append(frame)
            unreadable += lines
        return pd.concat(frames), unreadable

    def selected(self, table: pd.DataFrame) -> np.ndarray:
        """Which rows of ``table`` the card's ``filter`` keeps."""
        keep = np.ones(len(table), dtype=bool)
        for column, values in self.filter.items():
            keep &= table[column].map(_canonical).isin(values).to_numpy()
        return keep

    @property
    def columns(self) -> list[str]:
        return [self.subject_column, *self.filter]

    def subject_ids(self, table: pd.DataFrame) -> tuple[list[str | None], list[str | None]]:
        """Per row: (the cohort's subject id or ``None``, reason it has none or ``None``)."""
        ids, reasons = [], []
        for cell in table[self.subject_column]:
            text = canonical_text(cell)
            if self.subject_regex is not None:
                match = self.subject_regex.search(text)
                text = canonical_text(match.group(1)) if match else ""
            ids.append(text or None)
            reasons.append(None if text else f"no subject id in column {self.subject_column!r} ({cell!r})")
        return ids, reasons


class CohortScan(NamedTuple):
    """What :meth:`CohortCard.scan` finds in a raw folder: usable records, unusable rows, unlisted images."""

    records: pd.DataFrame
    problems: pd.DataFrame
    unlisted: pd.DataFrame


@dataclass(frozen=True)
class CohortCard:
    """A validated cohort card. Build it with :meth:`from_yaml`; see ``cohorts/README.md`` for the keys.

    Attributes
    ----------
    name
        Cohort name, the ``cohort`` column of the records unless a ``cohort`` label says otherwise.
    modality
        ``brain_t1``, ``chest_xray`` or ``digits``.
    pipeline
        Preprocessing config; relative paths in the card are relative to the folder above the card's
        folder (the repository root for cards in ``cohorts/``). ``None`` for generated cohorts.
    labels
        Label name -> :class:`Label`, in card order.
    """

    path: Path
    name: str
    description: str
    modality: str
    pipeline: Path | None
    images: Images | None
    metadata: Metadata | None
    labels: Mapping[str, Label]
    generator: str | None

    @classmethod
    def from_yaml(cls, path: str | Path) -> CohortCard:
        """Read and validate a card.

        Raises
        ------
        CardError
            Naming the card file and the key at fault, and what to write instead.
        """
        path = Path(path)
        try:
            spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CardError(f"{path}: cohort card not found; the cards shipped with mimm-med are in cohorts/") from None
        except IsADirectoryError:
            raise CardError(f"{path}: is a folder; pass a cohort card file such as cohorts/ukb.yaml") from None
        except UnicodeDecodeError:
            raise CardError(f"{path}: not UTF-8 text; a cohort card is a YAML file such as cohorts/ukb.yaml") from None
        except yaml.YAMLError as error:
            raise CardError(f"{path}: not valid YAML: {error}") from None
        where = _Where(path)
        spec = _check_type(spec, where, dict)
        _check_keys(
            spec, ("name", "description", "modality", "pipeline", "images", "metadata", "labels", "generator"), where
        )
        name = _require(spec, "name", where)
        modality = _require(spec, "modality", where)
        if modality not in MODALITIES:
            raise (where / "modality").error(f"unknown modality {modality!r}; choose one of {list(MODALITIES)}")
        generator = spec.get("generator")
        if generator is None:
            pipeline = path.resolve().parent.parent / _require(spec, "pipeline", where)
            images = Images.from_spec(_require(spec, "images", where, dict), where / "images")
            metadata = Metadata.from_spec(_require(spec, "metadata", where, dict), where / "metadata")
        else:
            _check_type(generator, where / "generator", str)
            for key in ("images", "metadata", "pipeline"):
                if key in spec:
                    raise (where / key).error(f"a generated cohort ({generator}) has no raw folder: remove '{key}'")
            pipeline = images = metadata = None
        label_specs = _require(spec, "labels", where, dict)
        if not label_specs:
            raise (where / "labels").error("empty; define at least the primary label")
        labels = {
            str(label): Label.from_spec(
                label, label_spec, where / "labels" / str(label), needs_column=generator is None
            )
            for label, label_spec in label_specs.items()
        }
        # The cohort is a label (a spurious factor) as well as a column; these are columns alone.
        for reserved in (SOURCE_ID, IMAGE, ROW, REASON, SUBJECT, STATUS):
            if reserved in labels:
                raise (where / "labels" / reserved).error(
                    f"{reserved!r} is a column that mimm-med gives every record, manifest or error table; "
                    "name the label otherwise"
                )
        return cls(
            path, name, str(spec.get("description", "")), modality, pipeline, images, metadata, labels, generator
        )

    @property
    def label_values(self) -> dict[str, list | None]:
        """Label name -> the values it can take (``None``: continuous), ``cohort`` excluded."""
        return {name: label.values for name, label in self.labels.items() if name != COHORT}

    def index(self, raw_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Index a raw cohort folder: the ``records`` and ``problems`` of :meth:`scan`."""
        scan = self.scan(raw_dir)
        return scan.records, scan.problems

    def scan(self, raw_dir: str | Path) -> CohortScan:
        """Index a raw cohort folder, and find the image files that no metadata row names.

        Returns
        -------
        CohortScan
            ``records``: one row per usable image: ``source_id`` (the cohort's own subject id), ``image``
            (absolute path), one column per label, ``cohort``.
            ``problems``: one row per unusable metadata row: ``source_id`` (``""`` if the row has none),
            ``image``, ``row`` (``"ukb_phenotypes.csv, line 12"``), ``reason``, ``cohort``. A row has every
            reason that applies, joined by ``"; "``. Rows naming one image with different labels are all
            problems; an exact repeat only loses the repeat.
            ``unlisted``: for a card with ``images.pattern``, the files under ``raw_dir`` that match it
            but no table row names (rows the ``filter`` drops count as naming theirs): ``source_id``
            (taken from the path, ``""`` if the pattern has no subject field), ``image``, ``cohort``.

        Raises
        ------
        CardError
            If the cohort is generated (no raw folder), a table is missing, has no data rows, or lacks
            a column the card uses, or ``metadata.filter`` keeps no row: then no row could be used.
        """
        if self.generator is not None:
            raise CardError(
                f"{self.path}: cohort {self.name!r} has no raw folder to index; "
                f"it is generated in memory by {self.generator}"
            )
        raw_dir = Path(raw_dir).resolve()
        uses: dict[str, list[str]] = {self.metadata.subject_column: ["metadata.subject"]}
        for column in self.metadata.filter:
            uses.setdefault(column, []).append(f"metadata.filter.{column}")
        for column in self.images.columns:
            uses.setdefault(column, []).append("images.pattern" if self.images.pattern else "images.column")
        for name, label in self.labels.items():
            if label.column is not None:
                uses.setdefault(label.column, []).append(f"labels.{name}.column")
        table, unreadable = self.metadata.read(raw_dir, list(uses), self.path, uses)
        paths, path_reasons = self.images.relative_paths(table)
        unlisted = self._unlisted(raw_dir, {p for p in paths if p is not None})
        keep = self.metadata.selected(table)
        if len(table) and not keep.any():
            raise self._filter_error(table)
        table = table[keep]
        paths = [p for p, kept in zip(paths, keep) if kept]
        path_reasons = [r for r, kept in zip(path_reasons, keep) if kept]
        places, table = table.index.tolist(), table.reset_index(drop=True)
        ids, id_reasons = self.metadata.subject_ids(table)
        images = [str(raw_dir / p) if p is not None else "" for p in paths]
        reasons = [[r] if r else [] for r in id_reasons]
        for row, (path, reason) in enumerate(zip(paths, path_reasons)):
            if reason:
                reasons[row].append(reason)
            elif not Path(images[row]).exists():
                reasons[row].append(_missing_image(path, Path(images[row])))
        labelled = {
            name: label.apply(table[label.column] if label.column else pd.Series([""] * len(table)))
            for name, label in self.labels.items()
        }
        self._check_repeats(images, ids, places, {name: values for name, (values, _) in labelled.items()}, reasons)
        columns = {SOURCE_ID: [i or "" for i in ids], IMAGE: images, ROW: places}
        for name, (values, label_reasons) in labelled.items():
            columns[name] = values
            for row, reason in enumerate(label_reasons):
                if reason:
                    reasons[row].append(reason)
        columns.setdefault(COHORT, [self.name] * len(table))
        frame = pd.DataFrame(
            columns, columns=[SOURCE_ID, IMAGE, ROW, *(n for n in self.labels if n != COHORT), COHORT]
        )
        bad = np.array([bool(r) for r in reasons], dtype=bool)
        records = frame[~bad].drop(columns=ROW).reset_index(drop=True)
        problems = frame.loc[bad, [SOURCE_ID, IMAGE, ROW, COHORT]].assign(
            **{REASON: ["; ".join(r) for r in reasons if r]}
        )
        unreadable_rows = pd.DataFrame(
            {SOURCE_ID: "", IMAGE: "", ROW: [place for place, _ in unreadable], COHORT: self.name,
             REASON: [problem for _, problem in unreadable]},
            index=range(len(unreadable)),
        )
        problems = pd.concat([problems, unreadable_rows], ignore_index=True)[
            [SOURCE_ID, IMAGE, ROW, REASON, COHORT]
        ].astype(str)
        records = records.astype({name: label.dtype for name, label in self.labels.items() if name != COHORT})
        return CohortScan(records, problems, unlisted)

    @staticmethod
    def _check_repeats(
        images: Sequence[str], ids: Sequence[str | None], places: Sequence[str], labels: Mapping[str, list],
        reasons: list[list[str]],
    ) -> None:
        """Add the reasons of rows that name an image an earlier row names too.

        A repeat with the same subject and labels only loses the repeat. Rows that name one image with
        different labels (a subject entered twice, sex 0 in one row and 1 in the other) all become
        problems: which of them is right cannot be told, and keeping the first would label it at random.
        """
        rows_of: dict[str, list[int]] = {}
        for row, image in enumerate(images):
            if image:
                rows_of.setdefault(image, []).append(row)
        for image, rows in rows_of.items():
            if len(rows) < 2:
                continue
            first = rows[0]
            differing = ["subject id"] if any(ids[row] != ids[first] for row in rows) else []
            differing += [name for name, values in labels.items() if any(values[row] != values[first] for row in rows)]
            if not differing:
                for row in rows[1:]:
                    reasons[row].append(f"image {image} is listed by an earlier row too")
                continue
            what = ", ".join(differing)
            reasons[first].append(
                f"image {image} is listed again by {'; '.join(places[row] for row in rows[1:])} with another {what}; "
                "correct the table: which row is right cannot be told"
            )
            for row in rows[1:]:
                reasons[row].append(f"image {image} is listed by an earlier row too, with another {what}")

    def _filter_error(self, table: pd.DataFrame) -> CardError:
        """The error for a ``metadata.filter`` that keeps no row: an empty cohort is a card mistake, not data."""
        held = []
        identifying = {self.metadata.subject_column, *self.images.columns}
        for column, values in self.metadata.filter.items():
            if column not in identifying:  # ids and paths must not reach a message
                seen = table[column].map(_canonical).value_counts().index[:5].tolist()
                held.append(f"{column!r} holds {seen} (its most common values), the filter keeps {list(values)}")
        return CardError(
            f"{self.path}: metadata.filter: keeps none of the {len(table)} rows of {list(self.metadata.tables)}; "
            + "; ".join(held) + ("; " if held else "")
            + "write the filter's values as the table spells them (case counts)"
        )

    def _unlisted(self, raw_dir: Path, listed: set[str]) -> pd.DataFrame:
        """Files matching ``images.pattern`` (one glob) that are not in ``listed``; see :meth:`scan`."""
        found = []
        if self.images.pattern is not None:
            parts = _FIELD.split(self.images.pattern)  # literal, field, literal, ...
            fields = parts[1::2]
            matcher = re.compile(
                "".join(re.escape(part) if i % 2 == 0 else "([^/]*)" for i, part in enumerate(parts))
            )
            glob = "".join(part if i % 2 == 0 else "*" for i, part in enumerate(parts))
            for path in sorted(raw_dir.glob(glob)):
                relative = path.relative_to(raw_dir).as_posix()
                match = matcher.fullmatch(relative)
                if relative in listed or match is None:
                    continue
                values = dict(zip(fields, match.groups()))
                source_id = values.get(self.metadata.subject_column, "")
                if source_id and self.metadata.subject_regex is not None:
                    id_match = self.metadata.subject_regex.search(source_id)
                    source_id = id_match.group(1) if id_match else ""
                found.append((source_id, str(path)))
        cohort = self.labels.get(COHORT)
        return pd.DataFrame(found, columns=[SOURCE_ID, IMAGE], dtype=str).assign(
            **{COHORT: str(cohort.value) if isinstance(cohort, ConstantLabel) else self.name}
        )
