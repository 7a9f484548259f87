"""Digits-Morpho: the Morpho-MNIST shortcut protocol on scikit-learn's real handwritten digits.

The 1,797 8×8 digits of ``sklearn.datasets.load_digits`` are upsampled to 28×28 (a 20×20 digit in a
4-pixel margin, as in MNIST). Every digit exists in four versions: thin or thick strokes
(morphological erosion or dilation, as Morpho-MNIST does) and upright or rotated by 90°. The primary
label is ``digit = 1`` for digits ≥ 5; the spurious factors are ``thickness`` (1 = thick) and
``rotation`` (1 = rotated). Each subject (original digit) belongs to exactly one of train, val and
test (the three test sets all hold the test subjects), with one version per set whose factors are
drawn by :func:`~mimm_med.data.confounding.assign_confounders`.
:func:`write_digits_splits` writes the sets as PNG images and split manifests, the input of the
``mimm_digits`` bundle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from monai.transforms import RandAffined
from scipy import ndimage
from skimage.transform import resize
from sklearn.datasets import load_digits

from ..checks import is_whole_number
from .confounding import assign_confounders, subject_pools, write_splits
from .manifest import COHORT, IMAGE, STATUS, STATUS_OK, SUBJECT
from .transforms import UntrackedCompose
from .writers import ImageFileWriter

PRIMARY = "digit"
FACTORS: tuple[str, ...] = ("thickness", "rotation")
IMAGE_SIZE = 28
_DIGIT_SIZE = 20


def _morph(images: np.ndarray, thick: bool) -> np.ndarray:
    """Grey-level dilation (thick) or erosion (thin) with a 3×3 cross at twice the output resolution.

    Working at 2× and averaging back down changes strokes by about half a pixel each side, as
    Morpho-MNIST's upscaled morphology does; at 1× dilation turns small digits into blobs.
    """
    footprint = ndimage.generate_binary_structure(2, 1)[None]
    operation = ndimage.grey_dilation if thick else ndimage.grey_erosion
    morphed = operation(images, footprint=footprint)
    n, h, w = morphed.shape
    return morphed.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


def digit_versions() -> tuple[np.ndarray, np.ndarray]:
    """All four versions of every digit.

    Returns
    -------
    images
        ``(N, 2, 2, 28, 28)`` float32 in [0, 1], indexed ``[subject, thickness, rotation]``.
    digits
        ``(N,)`` the digit 0–9 of each subject.
    """
    data = load_digits()
    small = data.images.astype(np.float32) / 16.0
    upsampled = resize(small, (len(small), 2 * _DIGIT_SIZE, 2 * _DIGIT_SIZE), order=3, anti_aliasing=False)
    margin = IMAGE_SIZE - _DIGIT_SIZE  # at 2× resolution
    canvas = np.pad(np.clip(upsampled, 0.0, 1.0), ((0, 0), (margin, margin), (margin, margin)))
    versions = np.empty((len(small), 2, 2, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for thick in (0, 1):
        stroked = _morph(canvas, thick=bool(thick))
        versions[:, thick, 0] = stroked
        versions[:, thick, 1] = np.rot90(stroked, k=1, axes=(1, 2))
    return versions, data.target.astype(np.int64)


def _records(
    images: np.ndarray, digits: np.ndarray, subjects: np.ndarray, factors: np.ndarray
) -> list[dict]:
    """MONAI-style list of dicts: channel-first image, primary label, both factors, subject id."""
    labels = (digits >= 5).astype(np.int64)
    return [
        {
            "image": images[s, f[0], f[1]][None],
            PRIMARY: int(labels[s]),
            "thickness": int(f[0]),
            "rotation": int(f[1]),
            "subject_id": f"digit{s:04d}",
        }
        for s, f in zip(subjects, factors)
    ]


def set_correlations(correlation: float, train_correlation: float | None = None) -> dict[str, float]:
    """The correlation each set of :func:`make_digits_morpho` is drawn at, in set order.

    Raises
    ------
    ValueError
        For a correlation outside [0, 1] (NaN included).
    """
    r_train = correlation if train_correlation is None else train_correlation
    if not (0.0 <= correlation <= 1.0 and 0.0 <= r_train <= 1.0):
        raise ValueError(f"correlations must lie in [0, 1], got {correlation} (train: {r_train})")
    return {
        "train": r_train,
        "val": r_train,
        "test-iid": correlation,
        "test-balanced": 0.5,
        "test-inverted": 1.0 - correlation,
    }


def make_digits_morpho(
    correlation: float,
    confounders: Sequence[str] = FACTORS,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.6, 0.1, 0.3),
    train_correlation: float | None = None,
) -> dict[str, list[dict]]:
    """Train / val / test-iid / test-balanced / test-inverted sets of Digits-Morpho.

    Parameters
    ----------
    correlation
        ``r``: probability that each confounder agrees with the primary label in train, val and
        test-iid; test-balanced uses 0.5 and test-inverted ``1 - r``.
    confounders
        Factors correlated with the label; a factor not listed is held at 0 (thin or upright).
    seed
        Seed of the subject split and the factor draws.
    fractions
        Subject fractions of train, val and test. All test sets use every test subject (each set
        draws its own versions), so they are the same digits under different shortcuts.
    train_correlation
        Correlation of train and val if it differs from ``correlation`` (0.5 for the oracle).

    Examples
    --------
    >>> sets = make_digits_morpho(0.9, seed=0)
    >>> sets["train"][0]["image"].shape
    (1, 28, 28)
    """
    unknown = [c for c in confounders if c not in FACTORS]
    if isinstance(confounders, str) or unknown or not confounders or len(set(confounders)) < len(confounders):
        raise ValueError(
            f"confounders must be a non-empty list of distinct names from {list(FACTORS)}, got {confounders!r}"
        )
    if not is_whole_number(seed, minimum=0):
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
    correlations = set_correlations(correlation, train_correlation)
    images, digits = digit_versions()
    rng = np.random.default_rng(int(seed))
    train, val, test = (np.array(pool, dtype=np.int64) for pool in subject_pools(range(len(digits)), fractions, rng))
    pools = {"train": train, "val": val, "test-iid": test, "test-balanced": test, "test-inverted": test}
    sets = {}
    for name, r in correlations.items():
        subjects = pools[name]
        drawn = assign_confounders((digits[subjects] >= 5).astype(np.int64), [r] * len(confounders), rng)
        factors = np.zeros((len(subjects), len(FACTORS)), dtype=np.int64)
        for column, factor in enumerate(confounders):
            factors[:, FACTORS.index(factor)] = drawn[:, column]
        sets[name] = _records(images, digits, subjects, factors)
    return sets


def digits_augmentation(key: str = "image") -> UntrackedCompose:
    """Random shift (±2 px), scale (±10 %) and tilt (±0.15 rad, 8.6°) of a digit, for training.

    Generic handwriting augmentation that touches neither factor: no morphology, and a tilt far from
    the 90° of ``rotation``. It matters most where a cell holds few digits: at r = 0.9 with both
    factors, the training digits that disagree with y on both number about 5 per class, and a
    network that may reweight them (rebalancing) otherwise memorizes them.

    Examples
    --------
    >>> augment = digits_augmentation()
    >>> augment({"image": np.zeros((1, 28, 28), np.float32)})["image"].shape
    torch.Size([1, 28, 28])
    """
    return UntrackedCompose(
        [
            RandAffined(
                keys=key,
                prob=1.0,
                translate_range=(2, 2),
                scale_range=(0.1, 0.1),
                rotate_range=0.15,
                padding_mode="zeros",
            )
        ]
    )


def write_digits_splits(
    out_dir: str | Path,
    correlation: float = 0.9,
    confounders: Sequence[str] = FACTORS,
    seed: int = 0,
    train_correlation: float | None = None,
) -> Path:
    """Write the sets of :func:`make_digits_morpho` as a split folder, as ``mimm-med cohort split`` does.

    Writes 8-bit PNGs ``images/<subject>/thickness<t>-rotation<r>.png`` (one per digit version; the
    test sets hold the same subjects and share a file where they draw the same version), the
    manifests ``train.csv``, ``val.csv``, ``test-iid.csv``, ``test-balanced.csv``, ``test-inverted.csv``
    (``subject_id, image, digit, thickness, rotation, cohort, status``) and ``cells.csv``.

    Parameters
    ----------
    out_dir
        Split folder, created if needed.
    correlation, confounders, seed, train_correlation
        As in :func:`make_digits_morpho`; ``train_correlation=0.5`` gives the oracle's training data.

    Returns
    -------
    pathlib.Path
        ``out_dir``.

    Examples
    --------
    Writing the 2,569 PNGs takes some 10 s (each is flushed to disk), hence not run as a test:

    >>> write_digits_splits("data/digits/splits", correlation=0.9)  # doctest: +SKIP
    PosixPath('data/digits/splits')
    >>> sorted(path.name for path in Path("data/digits/splits").iterdir())  # doctest: +SKIP
    ['cells.csv', 'images', 'test-balanced.csv', 'test-iid.csv', 'test-inverted.csv', 'train.csv', 'val.csv']
    """
    out_dir = Path(out_dir)
    sets = make_digits_morpho(correlation, confounders, seed, train_correlation=train_correlation)
    requested = set_correlations(correlation, train_correlation)
    images: dict[Path, np.ndarray] = {}
    splits = {}
    for name, records in sets.items():
        rows = []
        for record in records:
            version = f"thickness{record['thickness']}-rotation{record['rotation']}.png"
            path = out_dir / "images" / record[SUBJECT] / version
            images[path] = record["image"][0]
            labels = {factor: record[factor] for factor in (PRIMARY, *FACTORS)}
            rows.append(
                {SUBJECT: record[SUBJECT], IMAGE: str(path.absolute()), **labels, COHORT: "digits", STATUS: STATUS_OK}
            )
        splits[name] = pd.DataFrame(rows)
        # a factor agrees with the label when their codes are equal, as assign_confounders draws them
        splits[name].attrs["agreement"] = {factor: {0: 0, 1: 1} for factor in confounders}
        # cells.csv's `requested` column, which missed_correlations compares the agreement with
        splits[name].attrs["requested"] = dict.fromkeys(confounders, requested[name])
    writer = ImageFileWriter("png", bit_depth=8)
    for path, image in images.items():
        writer(image.T[None], path.with_suffix(""))  # the writer takes MONAI's [column, row] indexing
    write_splits(splits, out_dir, PRIMARY, list(confounders))
    return out_dir
