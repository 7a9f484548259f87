"""Run a preprocessing pipeline (a MONAI config) over a cohort: pseudonymous, resumable, shardable.

Outputs, all under ``out_dir``::

    images/<subject_id>/<image_id>.<ext>   one processed image per raw image
    manifest.csv                           every image: subject_id, image, labels, cohort, status
    errors.csv                             every failure: subject_id (blank for a metadata row without an
                                           id), file (pseudonymised), reason (of a metadata row: led by its
                                           table and line); ``mimm-med cohort locate`` maps it back
    pipeline.json                          the pipeline config with its overrides, for provenance, and
                                           the fingerprint of the pseudonymisation key (never the key)

With ``--shard i/n`` the tables are ``manifest-shard-i-of-n.csv`` / ``errors-shard-i-of-n.csv``.
A re-run with the same ``out_dir`` keeps images that exist, are not empty and that a manifest there
(whole or shard part) lists as ``ok``, and redoes the rest; it must use the same key, and the same
settings once an image has been written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import signal
import time
from collections.abc import Generator, Iterable, Iterator, Mapping
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from monai.bundle import ConfigComponent, ConfigParser
from monai.bundle.utils import EXPR_KEY, ID_REF_KEY, MACRO_KEY
from tqdm.auto import tqdm

from mimm_med.data.manifest import (
    COHORT,
    IMAGE,
    KEY_FINGERPRINT,
    PIPELINE_RECORD,
    STATUS,
    STATUS_FAILED,
    STATUS_OK,
    SUBJECT,
    cannot_write,
    file_size,
    read_manifest,
    write_manifest,
)
from mimm_med.data.cohort_card import ROW
from mimm_med.data.pseudonym import SUBJECT_PREFIX, Pseudonymiser, canonical_text, mask_identifier, mask_subject
from mimm_med.data.writers import atomic_output

logger = logging.getLogger(__name__)

SOURCE_ID = "source_id"
ERROR_COLUMNS = (SUBJECT, "file", "reason")
CHECKPOINT_SECONDS = 30.0
_REASON_CHARS = 500
WORKER_DIED = (
    "the worker process died while processing this image, also when retried alone (a crash in the image "
    "reader, or out of memory): check the file, or give each worker more memory"
)


class PreprocessError(RuntimeError):
    """The run cannot start: bad settings, or an output folder made with other settings or another key."""


class OutputError(PreprocessError):
    """An output cannot be written (read-only folder, full disk): the run stops, as every image would fail."""


@contextlib.contextmanager
def writing(target: str | Path) -> Iterator[None]:
    """Raise an ``OSError`` of the block as an :class:`OutputError` that names ``target``."""
    try:
        yield
    except OSError as error:
        raise OutputError(cannot_write(target, error)) from error


# --------------------------------------------------------------------------------------- config


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``KEY=VALUE`` and read VALUE as JSON where it is JSON (``[64,64,64]``, ``true``), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise PreprocessError(f"--set expects KEY=VALUE, e.g. spatial_size=[64,64,64] (brain pipeline); got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _json_form(value: Any) -> str | None:
    """The form of a JSON value as a message names it (``"a number"``, ``"a list"``, ...); ``None`` for null."""
    if value is None:
        return None
    if isinstance(value, bool):  # before numbers: a bool is an int to Python, not to JSON
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        # Evaluated when the config is parsed, so its form is not known here.
        return None if value.startswith((EXPR_KEY, ID_REF_KEY, MACRO_KEY)) else "text"
    return "a list" if isinstance(value, (list, tuple)) else "a mapping"


def load_pipeline_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict:
    """Read a pipeline config and apply ``overrides`` (config ids such as ``spatial_size``).

    An override must have the JSON form of the setting's default (int and float are both numbers);
    a default of null, a MONAI expression or reference (``$...``, ``@...``, ``%...``), on either side,
    is not checked.

    Raises
    ------
    PreprocessError
        If an override names a setting the config does not have (a typo would otherwise be ignored), or
        has another form than its default: the pipeline would fail on every image, e.g. a list
        ``spatial_size`` in the chest X-ray pipeline, which takes the longest side as one number.
    """
    parser = ConfigParser(ConfigParser.load_config_file(path))
    missing = object()
    for key, value in (overrides or {}).items():
        default = parser.get(key, missing)
        if default is missing:
            settings = [k for k, v in parser.get().items() if not ConfigComponent.is_instantiable(v)]
            raise PreprocessError(f"{path} has no setting {key!r}; its settings are {settings}")
        expected, given = _json_form(default), _json_form(value)
        if expected is not None and given is not None and given != expected:
            example = json.dumps(default, separators=(",", ":"))
            raise PreprocessError(
                f"{key} is {expected} in {path} (default {json.dumps(default)}), got {json.dumps(value)}; "
                f"give {expected} like the default, e.g. --set {key}={example}"
            )
        parser[key] = value
    return parser.get()


def output_suffix(config: Mapping) -> str:
    """Suffix of the files the config's writer makes, e.g. ``".nii.gz"``."""
    return ConfigParser(dict(config)).get_parsed_content("writer").suffix


class PreprocessPipeline:
    """The transform chain and writer of a pipeline config, built once and applied per image.

    Parameters
    ----------
    config
        Config content (see ``preprocessing/*.json``) with a ``preprocessing`` transform taking
        ``{image_key: path}`` and a ``writer`` (:class:`~mimm_med.data.writers.ImageFileWriter`).

    Examples
    --------
    A noisy box of "head" in air at 2 mm, through the brain pipeline at a 32³ grid:

    >>> import tempfile
    >>> import nibabel as nib
    >>> import numpy as np
    >>> folder = Path(tempfile.mkdtemp())
    >>> head = np.pad(np.random.default_rng(0).uniform(50, 100, (30, 30, 20)).astype(np.float32), 5)
    >>> nib.save(nib.Nifti1Image(head, np.diag([2.0, 2.0, 2.0, 1.0])), folder / "T1.nii.gz")
    >>> config = load_pipeline_config("preprocessing/brain_t1.json", {"spatial_size": [32, 32, 32]})
    >>> pipeline = PreprocessPipeline(config)
    >>> output = pipeline(folder / "T1.nii.gz", folder / "images" / "sub-1" / "img-2")
    >>> output.relative_to(folder).as_posix()
    'images/sub-1/img-2.nii.gz'
    >>> image = nib.load(output).get_fdata()
    >>> image.shape, float(image.min()), float(image.max())
    ((32, 32, 32), 0.0, 1.0)
    """

    def __init__(self, config: Mapping) -> None:
        parser = ConfigParser(dict(config))
        try:
            self.image_key: str = parser.get_parsed_content("image_key", default="image")
            self.transform = parser.get_parsed_content("preprocessing")
            self.writer = parser.get_parsed_content("writer")
        except Exception as error:
            raise PreprocessError(
                f"the preprocessing pipeline cannot be built ({describe_error(error)}); "
                "install what it names, or fix the pipeline's config or the --set that changed it"
            ) from error

    def __call__(self, source: str | Path, stem: str | Path) -> Path:
        """Process the raw image (file or DICOM series folder) ``source``; write ``stem + suffix``."""
        source = Path(source)
        if not source.exists():
            raise FileNotFoundError("file not found")
        if source.is_file() and source.stat().st_size == 0:
            raise ValueError("empty file (0 bytes)")
        data = self.transform({self.image_key: str(source)})
        with writing(f"{stem}{self.writer.suffix}"):
            return self.writer(data[self.image_key], stem)


# ---------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Shard:
    """Subset ``index`` of ``count`` (0-based) of a cohort's subjects, chosen by their keyed pseudonym."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """Read ``"i/n"``, e.g. ``"0/4"`` for the first of four shards."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match or not 0 <= int(match[1]) < int(match[2]):
            raise PreprocessError(f"--shard expects i/n with 0 <= i < n (e.g. $SLURM_ARRAY_TASK_ID/4), got {text!r}")
        return cls(int(match[1]), int(match[2]))

    def __contains__(self, subject_id: str) -> bool:
        if not subject_id:  # a metadata row without an id is reported once, by the first shard
            return self.index == 0
        return int(subject_id.removeprefix(SUBJECT_PREFIX), 16) % self.count == self.index

    def suffix(self) -> str:
        """File name suffix of this shard's tables: ``""`` for the whole cohort."""
        return "" if self.count == 1 else f"-shard-{self.index}-of-{self.count}"


@dataclass(frozen=True)
class Masking:
    """Replaces identifying text in report lines: raw path → ``shown`` path, raw folder, source id → pseudonym."""

    pairs: tuple[tuple[str, str], ...]
    source_id: str
    subject_id: str

    @classmethod
    def of(cls, source: str, raw_dir: Path, source_id: str, subject_id: str) -> tuple[str, Masking]:
        """The path to show for ``source`` (relative to ``raw_dir``, id masked) and the masking to use."""
        # Raw layouts put subject ids into paths (UK Biobank: <eid>_20252_2_0/T1/T1.nii.gz; BIDS: sub-<id>/anat/).
        shown = mask_subject(_relative(source, raw_dir), source_id, subject_id)
        return shown, cls(((source, shown), (str(raw_dir), "<raw>")), source_id, subject_id)

    def __call__(self, text: str) -> str:
        for identifier, replacement in self.pairs:
            text = mask_identifier(text, identifier, replacement)
        return mask_subject(text, self.source_id, self.subject_id)


def _relative(source: str, raw_dir: Path) -> str:
    return Path(source).relative_to(raw_dir).as_posix() if Path(source).is_relative_to(raw_dir) else source


@dataclass(frozen=True)
class Task:
    """One raw image to process; ``shown`` and ``mask`` keep its reports pseudonymous."""

    source: Path
    stem: Path
    shown: str
    mask: Masking


def describe_error(error: BaseException) -> str:
    """A one-line reason for ``error``: the original exception under MONAI's "applying transform" wrappers, its lines joined."""
    while error.__cause__ is not None:
        error = error.__cause__
    # one line, but all of it: libraries put the fix (the package to install) on later lines
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{type(error).__name__}: {text}"[:_REASON_CHARS]


def _process(pipeline: PreprocessPipeline, task: Task) -> tuple[str, str]:
    try:
        pipeline(task.source, task.stem)
    except OutputError:
        raise  # the output folder is at fault, not this image: every other image would fail the same way
    except Exception as error:  # one bad file must never stop the others
        return STATUS_FAILED, task.mask(describe_error(error))
    return STATUS_OK, ""


_WORKER_PIPELINE: PreprocessPipeline | None = None


def _init_worker(config: Mapping) -> None:
    global _WORKER_PIPELINE
    # The parent handles Ctrl-C and lets running images finish, so no worker dies mid-write.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A forked worker inherits the CLI's SIGTERM-as-interrupt handler; the pool's shutdown must just end it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # n workers × all-core torch ops would oversubscribe the CPU, and a worker forked from a process
    # that ran OpenMP threads hangs in its first multi-threaded op (seen with 2 threads, one worker, the
    # throughput benchmark). One thread lost nothing: 4.11 volumes/s against 4.10 in this process.
    torch.set_num_threads(1)
    _WORKER_PIPELINE = PreprocessPipeline(config)


def _process_in_worker(task: Task) -> tuple[str, str]:
    return _process(_WORKER_PIPELINE, task)


def _isolated(task: Task, config: Mapping) -> tuple[str, str]:
    """Process ``task`` alone in a fresh worker process: if that one dies too, this image killed it."""
    with ProcessPoolExecutor(1, initializer=_init_worker, initargs=(dict(config),)) as pool:
        try:
            return pool.submit(_process_in_worker, task).result()
        except BrokenProcessPool:
            return STATUS_FAILED, WORKER_DIED


def _run_pool(
    tasks: Iterator[Task], config: Mapping, workers: int
) -> Generator[tuple[Task, tuple[str, str]], None, list[Task]]:
    """Yield results of ``tasks`` from one pool of ``workers`` processes; return those a dying worker took down.

    A worker that dies (a crash in a reader, the out-of-memory killer) breaks the whole pool: every
    task in flight fails with :class:`BrokenProcessPool`, though only one of them caused it.
    """
    pending: dict[Future, Task] = {}
    lost: list[Task] = []
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(dict(config),)) as pool:
        try:
            while True:
                # A short queue per worker keeps memory flat and an interrupt quick.
                while not lost and len(pending) < 4 * workers and (task := next(tasks, None)) is not None:
                    try:
                        pending[pool.submit(_process_in_worker, task)] = task
                    except BrokenProcessPool:
                        lost.append(task)
                if not pending:
                    return lost
                finished, _ = wait(pending, return_when=ALL_COMPLETED if lost else FIRST_COMPLETED)
                for future in finished:
                    task = pending.pop(future)
                    if isinstance(future.exception(), BrokenProcessPool):
                        lost.append(task)
                    else:
                        yield task, future.result()
        except KeyboardInterrupt:
            for future in pending:
                future.cancel()
            for future in wait(pending).done:
                if not future.cancelled() and future.exception() is None:
                    yield pending[future], future.result()
            raise
        finally:
            # Also when the caller stops early (an OutputError, an interrupt between results): the
            # pool's shutdown would otherwise run every queued image first.
            for future in pending:
                future.cancel()


def run_tasks(tasks: Iterable[Task], config: Mapping, workers: int = 1) -> Iterator[tuple[Task, tuple[str, str]]]:
    """Yield ``(task, (status, reason))`` as tasks finish, in ``workers`` processes (0: in this process).

    On ``KeyboardInterrupt`` pending tasks are cancelled, running ones finish and are yielded, then
    the interrupt propagates. On :class:`OutputError` pending tasks are cancelled and it propagates.
    A worker process that dies costs only the image it was processing: the tasks in flight are
    retried one at a time, each in a fresh worker, and one whose worker dies again fails. In this
    process (``workers=0``, for a debugger) such an image stops the run.
    """
    pipeline = PreprocessPipeline(config)  # a config that cannot be built fails here, once, not in every worker
    if workers == 0:
        for task in tasks:
            yield task, _process(pipeline, task)
        return
    tasks = iter(tasks)
    while lost := (yield from _run_pool(tasks, config, workers)):
        # Any of them may have killed the worker; alone, only the one that did fails.
        for task in lost:
            yield task, _isolated(task, config)


# ------------------------------------------------------------------------------------------ run


@dataclass
class PreprocessSummary:
    """Counts of one run, and where its tables are."""

    done: int
    skipped: int
    failed: int
    problems: int
    seconds: float
    manifest: Path
    errors: Path
    unlisted: tuple[str, ...] = ()  # image files without a metadata row, shown as errors.csv shows files

    @property
    def ok(self) -> bool:
        """Whether every image and metadata row made it."""
        return self.failed == 0 and self.problems == 0

    def __str__(self) -> str:
        return (
            f"preprocess: {self.done} done, {self.skipped} skipped, {self.failed} failed, "
            f"{self.problems} metadata problems in {self.seconds:.1f} s; manifest {self.manifest}"
            + ("" if self.ok else f"; reasons in {self.errors}")
            + (f"; {len(self.unlisted)} images without a metadata row, not processed" if self.unlisted else "")
        )


def check_output_settings(config: Mapping, out_dir: Path, key_fingerprint: str) -> None:
    """Record ``config`` and the key's fingerprint in ``out_dir/pipeline.json``; refuse an ``out_dir`` made otherwise.

    Resuming into a folder preprocessed at another size or spacing would mix both in one manifest;
    with another key, it would redo every subject under a second id. Other settings are recorded
    instead, with a warning, while ``out_dir`` holds no image (every earlier image failed, or none
    ran): no output depends on them. A ``pipeline.json`` from before fingerprints were recorded is
    taken to match the key and gets the fingerprint.

    Raises
    ------
    PreprocessError
        If ``out_dir`` was made with another key, or holds images made with other settings.
    """
    path = out_dir / PIPELINE_RECORD
    record = json.loads(json.dumps({**config, KEY_FINGERPRINT: key_fingerprint}))
    if not path.exists():
        _create_once(path, json.dumps(record, indent=2))
    recorded = json.loads(path.read_text(encoding="utf-8"))
    legacy = KEY_FINGERPRINT not in recorded
    if recorded.setdefault(KEY_FINGERPRINT, key_fingerprint) != key_fingerprint:
        raise PreprocessError(
            f"{out_dir} was preprocessed with another pseudonymisation key (its fingerprint in {path} is not "
            "that of the key given); pass the key that folder was made with, or use a new --out"
        )
    replace = legacy
    if recorded != record:
        if _holds_images(out_dir):
            raise PreprocessError(
                f"{out_dir} was preprocessed with other pipeline settings (see {path}); "
                "use a new --out, or delete that folder to start over"
            )
        logger.warning(
            "%s holds no image made with the pipeline settings recorded in %s; recording this run's instead",
            out_dir,
            path,
        )
        replace = True
    # A record that matches is left alone: shards running at once into one --out would otherwise
    # rewrite it together, each removing the other's temporary file as a stale one.
    if replace:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")


def _holds_images(out_dir: Path) -> bool:
    """Whether any file is under ``out_dir/images``: a finished image, or one a shard running now is writing."""
    # Files, not the manifests' ok rows: a running shard lists its images only at its next checkpoint.
    return any(path.is_file() for path in (out_dir / "images").rglob("*"))


def _create_once(path: Path, text: str) -> None:
    """Write ``path`` atomically unless it exists: of shards starting at once, the first one's stays."""
    tmp = path.with_name(f".new-{os.getpid()}-{secrets.token_hex(4)}-{path.name}")  # its own: no one deletes it
    try:
        tmp.write_text(text, encoding="utf-8")
        try:
            os.link(tmp, path)  # fails if another shard has made it meanwhile, which the caller then compares
        except FileExistsError:
            pass
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            os.replace(tmp, path)  # a file system without hard links: last one wins
    finally:
        tmp.unlink(missing_ok=True)


def _plan(
    records: pd.DataFrame, raw_dir: Path, out_dir: Path, suffix: str, pseudonymiser: Pseudonymiser, shard: Shard
) -> tuple[dict[Path, dict], list[Task]]:
    """Manifest rows (without status) and tasks of this shard's records, keyed by output stem (a repeat: once)."""
    labels = [c for c in records.columns if c not in (SOURCE_ID, IMAGE, COHORT)]
    rows, tasks = {}, []
    for record in records.to_dict("records"):
        source_id, cohort, source = canonical_text(record[SOURCE_ID]), str(record[COHORT]), str(record[IMAGE])
        subject_id = pseudonymiser.subject(cohort, source_id)
        if subject_id not in shard:
            continue
        shown, mask = Masking.of(source, raw_dir, source_id, subject_id)
        # Hashed as paths were masked before a BIDS sub-<id> became the bare pseudonym (sub-sub-<hash>), so that
        # the images of earlier runs keep their names.
        hashed = mask_identifier(_relative(source, raw_dir), source_id, subject_id)
        stem = out_dir / "images" / subject_id / pseudonymiser.image(cohort, source_id, hashed)
        if stem in rows:  # a repeated record: processing it twice would race two workers for one file
            continue
        rows[stem] = {SUBJECT: subject_id, IMAGE: f"{stem}{suffix}", **{k: record[k] for k in labels}, COHORT: cohort}
        tasks.append(Task(Path(source), stem, shown, mask))
    return rows, tasks


def _subject(pseudonymiser: Pseudonymiser, cohort: str, source_id: str) -> str:
    """The pseudonym of ``source_id``; ``""`` for no id, which must not pass for a subject of its own."""
    return pseudonymiser.subject(cohort, source_id) if source_id else ""


def _problem_reports(problems: pd.DataFrame, raw_dir: Path, pseudonymiser: Pseudonymiser, shard: Shard) -> list[dict]:
    """Error report rows of this shard's unusable metadata rows, each reason led by the row's table and line."""
    reports = []
    for problem in problems.to_dict("records"):
        source_id, cohort = canonical_text(problem[SOURCE_ID]), str(problem[COHORT])
        subject_id = _subject(pseudonymiser, cohort, source_id)
        if subject_id in shard:
            shown, mask = Masking.of(str(problem[IMAGE]), raw_dir, source_id, subject_id)
            # The place is left out of the masking: a line number may equal the id.
            place = f"{problem[ROW]}: " if problem.get(ROW) else ""
            reason = f"metadata: {place}{mask(problem['reason'])}"
            reports.append({SUBJECT: subject_id, "file": shown, "reason": reason})
    return reports


def _unlisted_shown(unlisted: pd.DataFrame, raw_dir: Path, pseudonymiser: Pseudonymiser, shard: Shard) -> list[str]:
    """This shard's images without a metadata row, as ``errors.csv`` shows files: relative, the id a pseudonym."""
    shown = []
    for image in unlisted.to_dict("records"):
        source_id = canonical_text(image[SOURCE_ID])
        subject_id = _subject(pseudonymiser, str(image[COHORT]), source_id)
        if subject_id in shard:
            shown.append(Masking.of(str(image[IMAGE]), raw_dir, source_id, subject_id)[0])
    return shown


def subject_sources(frames: Iterable[pd.DataFrame], pseudonymiser: Pseudonymiser) -> dict[str, tuple[str, list[str]]]:
    """Pseudonym -> (source id, raw images) of every subject with an id in ``frames`` (``source_id``, ``image``,
    ``cohort``: the records, problems and unlisted images of a card's scan), for whoever holds the key."""
    sources: dict[str, tuple[str, list[str]]] = {}
    for frame in frames:
        for row in frame.to_dict("records"):
            source_id = canonical_text(row[SOURCE_ID])
            if source_id:
                _, images = sources.setdefault(pseudonymiser.subject(str(row[COHORT]), source_id), (source_id, []))
                if row[IMAGE]:
                    images.append(str(row[IMAGE]))
    return sources


def unmask_file(shown: str, subject_id: str, source_id: str, raw_dir: Path, images: Iterable[str]) -> Path:
    """The raw path of a ``file`` of ``errors.csv``: the one of the subject's raw ``images`` that :meth:`Masking.of`
    shows as ``shown``; else ``shown`` with the pseudonym replaced by ``source_id``."""
    # Matched rather than inverted: both <id> and sub-<id> are shown as the pseudonym.
    for image in images:
        if Masking.of(str(Path(image).resolve()), raw_dir, source_id, subject_id)[0] == shown:
            return Path(image).resolve()
    return raw_dir / mask_identifier(shown, subject_id, source_id)


def finished_images(out_dir: Path) -> set[str]:
    """Images that exist, are not empty and that a manifest in ``out_dir`` lists as ``ok``.

    Any manifest counts, the whole one or shard parts: a cohort sharded 4 ways can be finished
    2 ways, or whole, without redoing what is done. An empty file (emptied by outside damage, or a
    partial copy) is redone: no reader can load it.
    """
    finished = set()
    for manifest in map(read_manifest, out_dir.glob("manifest*.csv")):
        ok = manifest[IMAGE][manifest[STATUS] == STATUS_OK]
        finished.update(p for p in ok if (file_size(p) or 0) > 0)
    return finished


def _write_tables(rows: Iterable[dict], errors: list[dict], columns: list[str], manifest: Path, report: Path) -> None:
    table = pd.DataFrame([row for row in rows if STATUS in row], columns=columns)
    with writing(f"--out {manifest.parent}"):
        write_manifest(table.sort_values([SUBJECT, IMAGE]), manifest)
        with atomic_output(report) as tmp:
            pd.DataFrame(errors, columns=ERROR_COLUMNS).sort_values([SUBJECT, "file"]).to_csv(tmp, index=False)


def preprocess_records(
    records: pd.DataFrame,
    problems: pd.DataFrame,
    config: Mapping,
    raw_dir: str | Path,
    out_dir: str | Path,
    pseudonymiser: Pseudonymiser,
    workers: int = 1,
    shard: Shard = Shard(),
    progress: bool = True,
    unlisted: pd.DataFrame | None = None,
) -> PreprocessSummary:
    """Preprocess a cohort's records into ``out_dir``; see the module docstring for the outputs.

    Parameters
    ----------
    records
        One row per raw image: ``source_id``, ``image`` (absolute path), one column per label, ``cohort``
        (a card's ``index`` result).
    problems
        Metadata rows the card could not use: ``source_id`` (``""``: none), ``image``, ``reason``, ``cohort``
        and, where known, ``row`` (its table and line); reported as failures.
    config
        Pipeline config from :func:`load_pipeline_config`.
    raw_dir
        Raw cohort folder; reports show paths relative to it.
    pseudonymiser
        Maps source ids to the subject ids of every output.
    workers
        Worker processes; 0 runs in this process, where an image that crashes its reader stops the run.
    shard
        The subset of subjects to process.
    unlisted
        Image files that no metadata row names (``source_id``, ``image``, ``cohort``; a card's
        :meth:`~mimm_med.data.cohort_card.CohortCard.scan`): not processed, not failures, but listed
        in the summary.

    Raises
    ------
    PreprocessError
        If ``out_dir`` was made with another key, or holds images made with other settings.
    OutputError
        If an output cannot be written (after the tables of what finished, where they can be): a
        bad input image only fails its own row, an unwritable ``out_dir`` stops the run.
    KeyboardInterrupt
        After the tables of what finished have been written: a re-run resumes.

    Examples
    --------
    A stand-in of four UK Biobank subjects, preprocessed to 16³ voxels in this process (``workers=0``; for
    a real cohort give one worker per core):

    >>> import tempfile
    >>> from mimm_med.data.cohort_card import CohortCard
    >>> from mimm_med.data.standins import generate_cohort
    >>> work = Path(tempfile.mkdtemp())
    >>> raw = generate_cohort("ukb", n=4, out=work / "raw", resolution_mm=6, progress=False)
    >>> card = CohortCard.from_yaml("cohorts/ukb.yaml")
    >>> scan = card.scan(raw)
    >>> config = load_pipeline_config(card.pipeline, {"spatial_size": [16, 16, 16]})
    >>> pseudonymiser = Pseudonymiser(b"a secret of 16 or more characters")  # in practice resolve_key(key_file=...)
    >>> summary = preprocess_records(scan.records, scan.problems, config, raw, work / "processed", pseudonymiser,
    ...                              workers=0, progress=False, unlisted=scan.unlisted)
    >>> print(summary)  # doctest: +ELLIPSIS
    preprocess: 4 done, 0 skipped, 0 failed, 0 metadata problems in ... s; manifest .../processed/manifest.csv
    >>> read_manifest(summary.manifest).columns.tolist()
    ['subject_id', 'image', 'sex', 'age', 'age_group', 'site', 'cohort', 'status']

    A re-run into the same folder keeps the finished images:

    >>> preprocess_records(scan.records, scan.problems, config, raw, work / "processed", pseudonymiser,
    ...                    workers=0, progress=False).skipped
    4
    """
    start = time.perf_counter()
    raw_dir, out_dir = Path(raw_dir).resolve(), Path(out_dir).resolve()
    with writing(f"--out {out_dir}"):
        out_dir.mkdir(parents=True, exist_ok=True)
        check_output_settings(config, out_dir, pseudonymiser.key_fingerprint)
    tables = out_dir / f"manifest{shard.suffix()}.csv", out_dir / f"errors{shard.suffix()}.csv"
    columns = [SUBJECT, IMAGE, *(c for c in records.columns if c not in (SOURCE_ID, IMAGE, COHORT)), COHORT, STATUS]
    rows, tasks = _plan(records, raw_dir, out_dir, output_suffix(config), pseudonymiser, shard)
    errors = _problem_reports(problems, raw_dir, pseudonymiser, shard)
    problem_count = len(errors)
    finished = finished_images(out_dir)
    todo = []
    for task in tasks:
        if rows[task.stem][IMAGE] in finished:
            rows[task.stem][STATUS] = STATUS_OK
        else:
            todo.append(task)

    failed, last_checkpoint = 0, time.monotonic()
    bar = tqdm(total=len(todo), unit="img", desc="preprocess", disable=not progress, dynamic_ncols=True)
    try:
        for task, (status, reason) in run_tasks(todo, config, workers):
            rows[task.stem][STATUS] = status
            if status == STATUS_FAILED:
                failed += 1
                errors.append({SUBJECT: rows[task.stem][SUBJECT], "file": task.shown, "reason": reason})
            bar.update()
            bar.set_postfix(failed=failed, refresh=False)
            if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                _write_tables(rows.values(), errors, columns, *tables)
                last_checkpoint = time.monotonic()
    finally:
        bar.close()
        _write_tables(rows.values(), errors, columns, *tables)
    return PreprocessSummary(
        done=len(todo) - failed,
        skipped=len(tasks) - len(todo),
        failed=failed,
        problems=problem_count,
        seconds=time.perf_counter() - start,
        manifest=tables[0],
        errors=tables[1],
        unlisted=tuple(_unlisted_shown(unlisted, raw_dir, pseudonymiser, shard)) if unlisted is not None else (),
    )
