"""Data-set adapters of the shortcut benchmark: the five confounded splits for a correlation r and a seed.

Every adapter turns ``(r, seed, oracle)`` into a :class:`BenchmarkData`: train / val / test-iid /
test-balanced / test-inverted records (images held in memory) and what :func:`~mimm_med.experiment.run_experiment`
needs to build the network. The oracle trains on data drawn at r = 0.5 and is tested on the same
test sets as every other method at r.

- :class:`DigitsData`: Digits-Morpho (digit ≥ 5; thickness, rotation), factors drawn per r.
- :class:`BrainStandinData`: stand-in UK Biobank + NAKO T1 MRI (age group; sex, cohort), generated and
  preprocessed once by :func:`mimm_med.commands.demo.prepare`, re-split per r and seed.
- :class:`ChestXrayStandinData`: stand-in CheXpert, frontal views (effusion; sex, devices), generated
  and preprocessed once, re-split per r and seed.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, ScaleIntensityRanged

from mimm_med.cli import subcommand_folder
from mimm_med.data.cohort_card import SHIPPED_CARDS
from mimm_med.data.confounding import cell_counts, confounded_splits, missed_correlations
from mimm_med.data.datalist import manifest_datalist
from mimm_med.data.digits_morpho import FACTORS, PRIMARY, digits_augmentation, make_digits_morpho
from mimm_med.data.pseudonym import write_synthetic_cohort_key

logger = logging.getLogger(__name__)

ORACLE_CORRELATION = 0.5
#: SmallCNN of the stand-ins, without dropout: dropout between batch-norm layers changes the variance
#: those layers see from training to evaluation, and on the stand-in brain the evaluation-mode network
#: put every image in one class (AUROC still 0.9). Instance norm would avoid that too, but it removes
#: each volume's overall intensity, which carries the brain's age signal (the oracle stopped learning).
SMALL_BATCH_BACKBONE: dict[str, Any] = {"channels": [16, 32, 64], "dropout": 0.0}


@dataclass(frozen=True)
class BenchmarkData:
    """One cell's data: the five splits as records, the factors that define the network, training defaults.

    Attributes
    ----------
    sets
        ``train``, ``val``, ``test-iid``, ``test-balanced``, ``test-inverted`` → records
        ``{"image": (C, *spatial) float32 array, <factor>: int code, "subject_id": str}``.
    config_defaults
        :class:`~mimm_med.experiment.ExperimentConfig` fields suited to this data set (batch size,
        backbone size); the benchmark's options override them.
    train_transform
        Augmentation of the training records, or None.
    """

    sets: dict[str, list[dict]]
    primary: str
    spurious: tuple[str, ...]
    num_classes: dict[str, int]
    spatial_dims: int
    config_defaults: dict[str, Any]
    in_channels: int = 1
    train_transform: Callable | None = None


class BenchmarkDataset(ABC):
    """A data set of the benchmark matrix.

    Attributes
    ----------
    name
        Name in the results (``dataset`` column).
    primary, spurious
        Primary label and spurious factors, all binary.
    spatial_dims
        2 or 3.
    config_defaults
        See :class:`BenchmarkData`: the stand-ins are small, so they take smaller batches and backbones.
    """

    name: str
    primary: str
    spurious: tuple[str, ...]
    spatial_dims: int
    config_defaults: dict[str, Any] = {}

    def prepare(self) -> None:
        """Generate or load whatever every cell reuses (idempotent); the default has nothing to do."""

    def train_transform(self) -> Callable | None:
        """Augmentation of the training records, or None (the default)."""
        return None

    @abstractmethod
    def splits(self, correlation: float, seed: int, oracle: bool = False) -> dict[str, list[dict]]:
        """The five splits at training correlation ``correlation`` (train and val at 0.5 for the oracle)."""

    def data(self, correlation: float, seed: int, oracle: bool = False) -> BenchmarkData:
        """:meth:`splits` with the factors, classes and dimensions."""
        return BenchmarkData(
            sets=self.splits(correlation, seed, oracle),
            primary=self.primary,
            spurious=self.spurious,
            num_classes={name: 2 for name in (self.primary, *self.spurious)},
            spatial_dims=self.spatial_dims,
            config_defaults=self.config_defaults,
            train_transform=self.train_transform(),
        )


class DigitsData(BenchmarkDataset):
    """Digits-Morpho: primary ``digit`` (≥ 5), spurious ``thickness`` and ``rotation``.

    Parameters
    ----------
    limit
        Keep at most this many records per split (a random subset: records come in shuffled subject
        order); ``None`` keeps all 1,797 digits.
    augment
        Shift, scale and tilt the training digits (:func:`~mimm_med.data.digits_morpho.digits_augmentation`).
    """

    name = "digits"
    primary = PRIMARY
    spurious = FACTORS
    spatial_dims = 2

    def __init__(self, limit: int | None = None, augment: bool = True) -> None:
        self.limit = limit
        self.augment = augment

    def train_transform(self) -> Callable | None:
        return digits_augmentation() if self.augment else None

    def splits(self, correlation: float, seed: int, oracle: bool = False) -> dict[str, list[dict]]:
        sets = make_digits_morpho(
            correlation, self.spurious, seed=seed, train_correlation=ORACLE_CORRELATION if oracle else None
        )
        return {name: records[: self.limit] for name, records in sets.items()}


class ManifestData(BenchmarkDataset):
    """A preprocessed cohort manifest, loaded into memory once and re-split per r and seed.

    Subclasses write the manifest (:meth:`write_manifest`) and name the label values in code order
    (``label_levels``, primary first).
    """

    label_levels: Mapping[str, Sequence]
    #: Value that preprocessing stored for intensity 1 (16-bit PNGs hold [0, 1] as 0..65535).
    stored_maximum: float = 1.0

    def __init__(self, cache: str | Path) -> None:
        self.cache = Path(cache)

    @abstractmethod
    def write_manifest(self) -> Path:
        """Generate and preprocess the stand-in cohort under ``cache``, skipping finished steps; return the manifest."""

    def load_transform(self) -> Compose:
        """MONAI transform that loads one preprocessed image as a channel-first float32 array in [0, 1]."""
        return Compose(
            [
                LoadImaged("image", image_only=True),
                EnsureChannelFirstd("image"),
                ScaleIntensityRanged("image", a_min=0.0, a_max=self.stored_maximum, b_min=0.0, b_max=1.0),
                EnsureTyped("image", data_type="numpy", dtype=np.float32, track_meta=False),
            ]
        )

    def prepare(self) -> None:
        _ = self.records

    @cached_property
    def records(self) -> list[dict]:
        """Every usable image of the manifest with its label codes, image preloaded."""
        log = self.cache / "prepare.log"
        with self._preparation_lock():
            if not self.cache.exists():
                print(f"preparing the {self.name} stand-in in {self.cache} (log: {log})", file=sys.stderr, flush=True)
                self.cache.mkdir(parents=True)
            # The generators and preprocess print progress; keep the benchmark's own bar readable.
            with log.open("a", encoding="utf-8") as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                manifest = self.write_manifest()
        datalist = manifest_datalist(manifest, self.label_levels)
        load = self.load_transform()
        return [{**record, "image": load({"image": record["image"]})["image"]} for record in datalist]

    @contextlib.contextmanager
    def _preparation_lock(self) -> Iterator[None]:
        """Hold the cache while this process prepares it.

        Benchmarks run side by side share the cache: a second one waits for the first to finish the
        cohort, then reuses it, instead of failing on the folder the first is still writing.
        """
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{self.cache}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"waiting for another process to prepare the {self.name} stand-in in {self.cache}", file=sys.stderr, flush=True)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def splits(self, correlation: float, seed: int, oracle: bool = False) -> dict[str, list[dict]]:
        records = self.records
        table = pd.DataFrame(
            {"subject_id": [r["subject_id"] for r in records], "row": np.arange(len(records))}
            | {name: [r[name] for r in records] for name in (self.primary, *self.spurious)}
        )
        splits = confounded_splits(table, self.primary, dict.fromkeys(self.spurious, correlation), seed=seed)
        # A cell recorded at r must have been trained and tested at r: say where the pool fell short.
        for miss in missed_correlations(cell_counts(splits, self.primary, self.spurious)).itertuples():
            logger.warning(
                "%s, r = %s, seed %d: in split %r %s agrees with %s in %.1f%% of %d images, not the requested %.1f%%: "
                "the stand-in cohort has too few images in its rarest cells to reach it; this cell is measured at the agreement reached",
                self.name, correlation, seed, miss.split, miss.factor, self.primary, 100 * miss.agreement,
                miss.images, 100 * miss.requested,
            )  # fmt: skip
        if oracle:
            # Same seed, so the same subject pools: only train and val are drawn again, at r = 0.5, and cut
            # to the sizes at r, so that the oracle differs by the correlation alone, not by more data.
            at_half = dict.fromkeys(self.spurious, ORACLE_CORRELATION)
            balanced = confounded_splits(table, self.primary, at_half, seed=seed)
            for name in ("train", "val"):
                size = min(len(balanced[name]), len(splits[name]))
                splits[name] = balanced[name].sample(n=size, random_state=seed)
        return {name: [records[row] for row in frame["row"]] for name, frame in splits.items()}


class BrainStandinData(ManifestData):
    """Stand-in UK Biobank + NAKO brain T1: primary ``age_group``, spurious ``sex`` and ``cohort``.

    Parameters
    ----------
    cache
        Folder of the generated and preprocessed cohort (reused when it exists).
    subjects
        Subjects per cohort.
    resolution_mm, size
        Voxel size of the generated volumes and edge of the preprocessed cube.
    """

    name = "brain"
    primary = "age_group"
    spurious = ("sex", "cohort")
    spatial_dims = 3
    config_defaults = {"batch_size": 8, "backbone_kwargs": SMALL_BATCH_BACKBONE, "recompute_bn": True}
    label_levels = {"age_group": ["young", "old"], "sex": ["female", "male"], "cohort": ["nako", "ukb"]}

    def __init__(self, cache: str | Path, subjects: int = 2000, resolution_mm: float = 4.0, size: int = 32) -> None:
        super().__init__(cache)
        self.subjects, self.resolution_mm, self.size = subjects, resolution_mm, size

    def write_manifest(self) -> Path:
        from mimm_med.commands.demo import prepare

        # The demo also writes one split (r = 0.9); the benchmark re-splits the merged manifest per cell.
        splits = prepare(self.cache, self.subjects, self.resolution_mm, self.size, correlation=0.9, seed=0)
        return splits.parent / "processed" / "brain.csv"


class ChestXrayStandinData(ManifestData):
    """Stand-in CheXpert, frontal views: primary ``effusion``, spurious ``sex`` and ``devices``.

    Parameters
    ----------
    cache
        Folder of the generated and preprocessed cohort (reused when it exists).
    patients
        Patients to generate (1 to 3 studies each, one frontal image per study).
    size
        Edge of the preprocessed square images; the phantom is generated at about that resolution.
    """

    name = "cxr"
    primary = "effusion"
    spurious = ("sex", "devices")
    spatial_dims = 2
    config_defaults = {"batch_size": 16, "backbone_kwargs": SMALL_BATCH_BACKBONE, "recompute_bn": True}
    label_levels = {"effusion": [0, 1], "sex": ["female", "male"], "devices": [0, 1]}
    stored_maximum = 65535.0  # the pipeline's 16-bit PNGs

    def __init__(self, cache: str | Path, patients: int = 3000, size: int = 64) -> None:
        super().__init__(cache)
        self.patients, self.size = patients, size

    def write_manifest(self) -> Path:
        from mimm_med.data.standins import FIELD_MM

        raw, processed, key_file = self.cache / "raw", self.cache / "processed", self.cache / "pseudonym.key"
        if not key_file.exists():
            # A random key here changed the quick r = 0.9 training set from 178 to 159 images between machines.
            write_synthetic_cohort_key(key_file, f"mimm-med benchmark, {self.name} stand-in")
        # Generate at about the output resolution: the phantom is smooth, finer pixels only cost time.
        resolution = max(FIELD_MM) / (2 * self.size)
        subcommand_folder(raw, ["cohort", "generate", "chexpert", "--n", str(self.patients),
                                "--resolution-mm", f"{resolution:.3f}", "--no-progress"])  # fmt: skip
        # Status 1: rows dropped by the card's policies (uncertain effusion, unknown sex), listed in errors.csv.
        subcommand_folder(processed, ["preprocess", "--cohort", str(SHIPPED_CARDS / "chexpert.yaml"), "--raw", str(raw),
                                      "--key-file", str(key_file), "--set", f"spatial_size={self.size}", "--no-progress"],
                          resume=True, allowed=(0, 1))  # fmt: skip
        return processed / "manifest.csv"


ADAPTERS: dict[str, type[BenchmarkDataset]] = {
    "digits": DigitsData,
    "brain": BrainStandinData,
    "cxr": ChestXrayStandinData,
}
#: Adapter arguments of the full benchmark and of ``--quick`` (tiny stand-ins, prepared in a minute or two).
#: The full brain cohort has 2,000 subjects per cohort, of which the r = 0.9 split keeps 929 for training and
#: 707 for the balanced test set: with 600, that set held 171 and a leakage probe of features without any
#: leak scattered by 5 points (standard deviation over permuted labels), too much to test a 55 % target.
SCALES: dict[str, dict[str, dict[str, float]]] = {
    "full": {
        "digits": {},
        "brain": {"subjects": 2000, "resolution_mm": 4.0, "size": 32},
        "cxr": {"patients": 3000, "size": 64},
    },
    "quick": {
        "digits": {},
        "brain": {"subjects": 160, "resolution_mm": 6.0, "size": 24},
        "cxr": {"patients": 800, "size": 48},
    },
}


def make_datasets(
    names: Sequence[str], cache: str | Path, scale: str = "full", augment: bool = True
) -> dict[str, BenchmarkDataset]:
    """Adapters for ``names`` at ``scale`` (a key of :data:`SCALES`).

    Each stand-in cohort is cached in a folder of ``cache`` named after its sizes, e.g.
    ``brain-subjects160-resolution_mm6-size24``, so the quick and full cohorts never mix.
    ``augment`` is Digits-Morpho's (:class:`DigitsData`); the stand-ins are not augmented.

    Raises
    ------
    ValueError
        For a data set that has no adapter (the message lists those that do).
    """
    unknown = [name for name in names if name not in ADAPTERS]
    if unknown:
        raise ValueError(f"unknown data sets {unknown}; choose from {list(ADAPTERS)}")
    made = {}
    for name in names:
        arguments = SCALES[scale][name]
        adapter = ADAPTERS[name]
        if issubclass(adapter, ManifestData):
            folder = Path(cache) / "-".join([name, *(f"{key}{value:g}" for key, value in arguments.items())])
            made[name] = adapter(folder, **arguments)
        else:
            made[name] = adapter(**arguments, augment=augment)
    return made
