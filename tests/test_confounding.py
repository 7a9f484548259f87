import warnings

import numpy as np
import pandas as pd
import pytest

from mimm_med.data.confounding import (
    assign_confounders,
    cell_balancing_weights,
    cell_counts,
    confounded_splits,
    write_splits,
)


def _cohort(n_subjects: int = 4000, images_per_subject: int = 1, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    subjects = np.repeat(np.arange(n_subjects), images_per_subject)
    per_subject = lambda values: np.repeat(rng.choice(values, n_subjects), images_per_subject)  # noqa: E731
    return pd.DataFrame(
        {
            "subject_id": [f"s{i}" for i in subjects],
            "age_group": per_subject(["old", "young"]),
            "sex": per_subject(["female", "male"]),
            "cohort": per_subject(["nako", "ukb"]),
        }
    )


@pytest.mark.parametrize("r", [0.7, 0.9, 0.95])
def test_splits_hit_requested_correlation_and_never_share_subjects(r):
    table = _cohort(images_per_subject=2)
    splits = confounded_splits(table, "age_group", {"sex": r, "cohort": r}, seed=1)
    expected = {"train": r, "val": r, "test-iid": r, "test-balanced": 0.5, "test-inverted": 1 - r}
    counts = cell_counts(splits, "age_group", ["sex", "cohort"])
    for split, target in expected.items():
        assert len(splits[split]) > 50, split
        for factor in ("sex", "cohort"):
            realised = counts[(counts.split == split) & (counts.factor == factor)].agreement.iloc[0]
            assert abs(realised - target) <= 0.02, (split, factor, realised, target)
    train, val = set(splits["train"].subject_id), set(splits["val"].subject_id)
    tests = set().union(*(set(splits[name].subject_id) for name in ("test-iid", "test-balanced", "test-inverted")))
    assert not train & val and not train & tests and not val & tests


def test_factors_stay_independent_given_primary():
    splits = confounded_splits(_cohort(8000), "age_group", {"sex": 0.9, "cohort": 0.9}, seed=2)
    train = splits["train"]
    old = train[train.age_group == "old"]
    p_sex, p_cohort = (old.sex == "female").mean(), (old.cohort == "nako").mean()
    p_joint = ((old.sex == "female") & (old.cohort == "nako")).mean()
    assert abs(p_joint - p_sex * p_cohort) < 0.03


def test_splits_are_seed_deterministic():
    table = _cohort(1000)
    a = confounded_splits(table, "age_group", {"sex": 0.8}, seed=3)
    b = confounded_splits(table, "age_group", {"sex": 0.8}, seed=3)
    c = confounded_splits(table, "age_group", {"sex": 0.8}, seed=4)
    assert all(a[k].equals(b[k]) for k in a)
    assert not a["train"].equals(c["train"])


def test_non_binary_or_missing_columns_are_refused():
    table = _cohort(100)
    table["age"] = np.arange(len(table))
    with pytest.raises(ValueError, match="exactly two values.*bin it with a label of the cohort card"):
        confounded_splits(table, "age", {"sex": 0.9})
    table["site"] = np.array(["a", "b", "c", "d"])[np.arange(len(table)) % 4]
    with pytest.raises(ValueError, match=r"found \[a, b, c, d\]; map its values onto two names in a label"):
        confounded_splits(table, "age_group", {"site": 0.9})
    with pytest.raises(ValueError, match="lacks columns.*scanner"):
        confounded_splits(table, "age_group", {"scanner": 0.9})
    with pytest.raises(ValueError, match="must lie in"):
        confounded_splits(table, "age_group", {"sex": 1.5})


def test_assigned_confounders_follow_correlation():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 20000)
    z = assign_confounders(y, [0.9, 0.6], rng)
    assert abs((z[:, 0] == y).mean() - 0.9) < 0.01
    assert abs((z[:, 1] == y).mean() - 0.6) < 0.01


def test_balancing_weights_equalise_cells():
    y = np.array([0] * 90 + [1] * 10)
    z = np.array([0] * 80 + [1] * 10 + [1] * 8 + [0] * 2)
    w = cell_balancing_weights({"y": y, "z": z})
    for yy in (0, 1):
        for zz in (0, 1):
            assert w[(y == yy) & (z == zz)].sum() == pytest.approx(0.25)


def test_agreement_follows_the_cohorts_own_direction():
    rng = np.random.default_rng(0)
    n = 4000
    cohort = rng.choice(["nako", "ukb"], n)
    # UKB is mostly old, NAKO mostly young: "old" must pair with "ukb"
    old = np.where(cohort == "ukb", rng.random(n) < 0.75, rng.random(n) < 0.25)
    table = pd.DataFrame(
        {"subject_id": [f"s{i}" for i in range(n)], "age_group": np.where(old, "old", "young"), "cohort": cohort}
    )
    splits = confounded_splits(table, "age_group", {"cohort": 0.9}, seed=0)
    train = splits["train"]
    assert ((train.age_group == "old") == (train.cohort == "ukb")).mean() == pytest.approx(0.9, abs=0.02)
    # the natural direction keeps far more subjects than the opposite pairing could
    assert len(train) > 0.45 * 0.6 * n
    counts = cell_counts(splits, "age_group", ["cohort"])
    assert counts[counts.split == "test-inverted"].agreement.iloc[0] == pytest.approx(0.1, abs=0.02)


def test_digits_augmentation_moves_a_digit_but_leaves_both_factors():
    from monai.data import get_track_meta

    from mimm_med.data.digits_morpho import digit_versions, digits_augmentation

    versions, _ = digit_versions()
    thin, thick = versions[:50, 0, 0], versions[:50, 1, 0]
    augment = digits_augmentation()
    augment.set_random_state(seed=0)
    augmented = np.stack([np.asarray(augment({"image": image[None]})["image"])[0] for image in thin])
    assert get_track_meta(), "the metadata setting must come back after each call"

    def correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))

    assert np.mean(np.abs(augmented - thin)) > 0.02, "augmentation must move the digit"
    # still upright: nearer the original than its 90° rotation is
    assert np.all(correlation(augmented, thin) > correlation(np.rot90(thin, axes=(1, 2)), thin))
    # still thin: the ink stays within the small change an affine resampling makes, far below dilation's
    ink_change = np.abs(augmented.sum((1, 2)) / thin.sum((1, 2)) - 1)
    dilation_change = thick.sum((1, 2)) / thin.sum((1, 2)) - 1
    assert np.median(ink_change) < 0.25 * np.median(dilation_change)


def _shortcut_cohort(minority: int, n: int = 2000) -> pd.DataFrame:
    """Sex follows the age group in all but ``minority`` subjects per age group: r = 0.98 cannot be drawn."""
    age_group = np.repeat(["old", "young"], n // 2)
    sex = np.where(age_group == "old", "male", "female")
    sex[:minority], sex[n // 2 : n // 2 + minority] = "female", "male"
    return pd.DataFrame({"subject_id": [f"s{i}" for i in range(n)], "age_group": age_group, "sex": sex})


def test_a_correlation_the_cohort_cannot_supply_is_reported_not_silent():
    from mimm_med.data.confounding import missed_correlations

    splits = confounded_splits(_shortcut_cohort(minority=0), "age_group", {"sex": 0.98}, seed=0)
    cells = cell_counts(splits, "age_group", ["sex"])
    train = cells[cells.split == "train"].set_index(["primary", "value"])
    assert train.loc[("old", "female"), "count"] == 0 and train.loc[("young", "male"), "count"] == 0  # listed, as 0
    assert (train["requested"] == 0.98).all() and (train["agreement"] == 1.0).all()
    missed = missed_correlations(cells).set_index("split")
    assert {"train", "val", "test-iid"} <= set(missed.index)
    assert missed.loc["train", "requested"] == 0.98 and missed.loc["train", "agreement"] == 1.0
    # a cohort that can supply it is not reported
    fine = confounded_splits(_shortcut_cohort(minority=200), "age_group", {"sex": 0.98}, seed=0)
    assert missed_correlations(cell_counts(fine, "age_group", ["sex"])).empty


def test_cells_csv_records_the_inverted_share_as_requested(tmp_path):
    table = _cohort(300)
    table["image"] = [str(tmp_path / f"{subject}.nii.gz") for subject in table.subject_id]
    table["status"] = "ok"
    splits = confounded_splits(table, "age_group", {"sex": 0.9, "cohort": 0.7}, seed=0)
    write_splits(splits, tmp_path, "age_group", ["sex", "cohort"])

    cells = pd.read_csv(tmp_path / "cells.csv", dtype={"requested": str})
    inverted = cells[cells.split == "test-inverted"].groupby("factor")["requested"].agg(set).to_dict()
    # 1.0 - 0.9 was written as 0.09999999999999998
    assert inverted == {"cohort": {"0.3"}, "sex": {"0.1"}}


def test_reported_cell_counts_are_the_actual_counts_of_every_split():
    table = _cohort(300, images_per_subject=3)
    splits = confounded_splits(table, "age_group", {"sex": 0.9, "cohort": 0.7}, fractions=(0.9, 0.0, 0.1), seed=5)
    assert splits["val"].empty
    cells = cell_counts(splits, "age_group", ["sex", "cohort"])
    assert len(cells) == 5 * 2 * 4  # every split, factor and cell, empty ones too
    for (split, factor), rows in cells.groupby(["split", "factor"]):
        frame = splits[split]
        for row in rows.itertuples():
            assert row.count == ((frame.age_group == row.primary) & (frame[factor] == row.value)).sum()
        assert rows["count"].sum() == len(frame)


def test_failed_images_and_rows_without_a_subject_never_enter_a_split():
    table = _cohort(1000, images_per_subject=2)
    table["status"] = np.where(np.arange(len(table)) % 3 == 0, "failed", "ok")
    table["image"] = [f"img{i}" for i in range(len(table))]
    splits = confounded_splits(table, "age_group", {"sex": 0.8}, seed=0)
    failed = set(table.image[table.status == "failed"])
    assert all(not failed & set(frame.image) for frame in splits.values())
    assert sum(len(frame) for frame in splits.values()) > 0
    table.loc[5, "subject_id"] = None
    with pytest.raises(ValueError, match="1 rows have no subject_id"):
        confounded_splits(table, "age_group", {"sex": 0.8})


def test_many_valued_or_missing_factor_labels_are_refused_readably():
    table = _cohort(100)
    table["age"] = np.arange(len(table), dtype=float)
    with pytest.raises(ValueError, match=r"found \[0\.0, 1\.0, 10\.0, 11\.0, 12\.0, … \(100 in all\)\]"):
        confounded_splits(table, "age_group", {"age": 0.9})
    table.loc[:2, "sex"] = np.nan
    with pytest.raises(ValueError, match="'sex' has 3 missing values"):
        confounded_splits(table, "age_group", {"sex": 0.9})


def test_stratified_partition_shares_every_cell_out_evenly():
    from mimm_med.data.confounding import stratified_partition

    rng = np.random.default_rng(0)
    # a rare cell of 8 images among 400: an unstratified part of 50 often holds none of it, or 3
    cells = [(1, 1)] * 8 + [(1, 0)] * 192 + [(0, 0)] * 100 + [(0, 1)] * 100
    datalist = [{"index": i, "y": y, "z": z} for i, (y, z) in enumerate(rng.permutation(cells))]
    parts = stratified_partition(datalist, ["y", "z"], seed=3, parts=8)
    assert [len(part) for part in parts] == [50] * 8
    for part in parts:
        counts = pd.Series([(item["y"], item["z"]) for item in part]).value_counts()
        assert counts[(1, 1)] == 1 and counts[(1, 0)] == 24  # 8 and 192 over 8 parts
        assert {counts[(0, 0)], counts[(0, 1)]} <= {12, 13}  # 100 each: 12 or 13 per part
    assert sorted(item["index"] for part in parts for item in part) == list(range(400))
    assert parts == stratified_partition(datalist, ["y", "z"], seed=3, parts=8)
    assert parts != stratified_partition(datalist, ["y", "z"], seed=4, parts=8)


def test_stratified_partition_names_a_cell_some_processes_lack_and_refuses_more_processes_than_records():
    from mimm_med.data.confounding import stratified_partition

    datalist = [{"index": i, "digit": 0} for i in range(8)] + [{"index": 8, "digit": 1}]
    with pytest.warns(UserWarning, match=r"only 1 training record\(s\) have digit = 1, fewer than the 2 processes: 1 of them"):
        parts = stratified_partition(datalist, ["digit"], seed=0, parts=2)
    assert sorted(sum(record["digit"] for record in part) for part in parts) == [0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every cell reaches both parts: nothing to warn of
        stratified_partition(datalist[:7] + datalist[8:] * 2, ["digit"], seed=0, parts=2)
    with pytest.raises(ValueError, match=r"holds 2 records, fewer than the 3 processes .* launch at most 2 \(torchrun"):
        stratified_partition(datalist[7:], ["digit"], seed=0, parts=3)


def test_stratified_partition_warns_of_a_rare_cell_from_rank_zero_alone(monkeypatch):
    from mimm_med.data import confounding

    datalist = [{"index": i, "digit": 0} for i in range(8)] + [{"index": 8, "digit": 1}]
    monkeypatch.setattr(confounding, "is_rank_zero", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # before: the same warning once per rank
        parts = confounding.stratified_partition(datalist, ["digit"], seed=0, parts=2)
    assert sorted(sum(record["digit"] for record in part) for part in parts) == [0, 1]
