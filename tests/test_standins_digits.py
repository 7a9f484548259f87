"""Digits-Morpho: the versions change only what their factor names, labels follow the digits, files match the arrays."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from mimm_med.cli import main
from mimm_med.data.digits_morpho import digit_versions, make_digits_morpho, set_correlations


@pytest.fixture(scope="module")
def versions() -> tuple[np.ndarray, np.ndarray]:
    return digit_versions()


def _centroids(images: np.ndarray) -> np.ndarray:
    rows = np.arange(images.shape[-1])
    ink = images.sum((1, 2))
    return np.stack([(images.sum(2) * rows).sum(1) / ink, (images.sum(1) * rows).sum(1) / ink], axis=1)


def test_thickness_thickens_strokes_in_place_and_rotation_is_an_exact_quarter_turn(versions):
    images, digits = versions
    thin, thick = images[:, 0, 0], images[:, 1, 0]
    assert images.shape == (1797, 2, 2, 28, 28) and images.dtype == np.float32
    assert np.array_equal(digits, load_digits().target)
    assert thin.max((1, 2)).min() > 0.5  # erosion leaves every digit legible
    assert (thick.sum((1, 2)) > 1.3 * thin.sum((1, 2))).all()  # every digit gets thicker
    assert (thick >= thin).all()  # dilation only adds ink (erosion only removes it)
    assert np.abs(_centroids(thick) - _centroids(thin)).max() < 1.0  # the digit stays where it is
    for t in (0, 1):
        assert np.array_equal(images[:, t, 1], np.rot90(images[:, t, 0], k=1, axes=(1, 2)))
    assert images[:, :, :, :3].max() == 0 and images[:, :, :, -3:].max() == 0  # the MNIST-like margin


def test_labels_follow_the_digit_and_factors_the_version_drawn(versions):
    images, digits = versions
    sets = make_digits_morpho(0.9, seed=0)
    for records in sets.values():
        for record in records[:200]:
            subject = int(record["subject_id"].removeprefix("digit"))
            assert record["digit"] == int(digits[subject] >= 5)
            assert np.array_equal(record["image"][0], images[subject, record["thickness"], record["rotation"]])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"confounders": ("thickness", "thickness")}, "distinct names"),  # was drawn twice, written once
        ({"confounders": "thickness"}, r"list of distinct names .* got 'thickness'"),  # was 9 unknown letters
        ({"seed": -1}, r"seed must be a whole number >= 0"),
        ({"correlation": float("nan")}, r"must lie in \[0, 1\]"),
    ],
)
def test_invalid_arguments_name_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        make_digits_morpho(**{"correlation": 0.9, **options})


def test_written_splits_record_the_requested_correlation_and_the_pngs_hold_the_arrays(tmp_path, capsys):
    out = tmp_path / "digits"
    # Only the rotation confounds: the CLI writes the same as write_digits_splits.
    assert main(["cohort", "digits", "--out", str(out), "--correlation", "0.8", "--confounders", "rotation"]) == 0
    capsys.readouterr()
    cells = pd.read_csv(out / "cells.csv")
    per_split = cells.groupby("split", sort=False)[["requested", "agreement"]].first()
    # Without recording them the column was blank, as for a split whose correlation is not known.
    assert per_split["requested"].to_dict() == pytest.approx(set_correlations(0.8))
    # Each subject's version is a Bernoulli draw: the agreement is within binomial noise of r.
    assert ((per_split["agreement"] - per_split["requested"]).abs() < 0.06).all()
    train = pd.read_csv(out / "train.csv")
    sets = make_digits_morpho(0.8, ("rotation",), seed=0)
    for row, record in zip(train.head(20).itertuples(), sets["train"]):
        stored = np.asarray(Image.open(out / row.image), dtype=np.float32) / 255.0
        assert np.abs(stored - record["image"][0]).max() <= 0.5 / 255 + 1e-6  # not transposed, 8-bit rounding
