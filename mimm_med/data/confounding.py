"""Confounding sampler: data sets in which each spurious factor agrees with the primary label at a chosen rate.

The evaluation protocol: for a training correlation ``r`` (the probability that a spurious factor
``z`` agrees with the primary label ``y``), training and validation data are drawn at ``r``, and three
held-out test sets at ``r`` (iid), ``0.5`` (balanced) and ``1 - r`` (inverted). Labels are binary; the
two values of each column are coded 0/1 in sorted order, and "agree" means equal codes.

Two ways to reach a correlation:

- :func:`confounded_splits` *selects* rows of a cohort whose factors are fixed per subject (MRI, X-ray);
- :func:`assign_confounders` *draws* factors for subjects whose factors can be set at will (Digits-Morpho).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.data import partition_dataset
from torch.utils.data import WeightedRandomSampler

from ..distributed import is_rank_zero
from .manifest import STATUS, STATUS_OK, write_manifest
from .writers import atomic_output

#: How far a split's agreement may miss the requested correlation before ``cohort split`` warns of it.
CORRELATION_TOLERANCE = 0.02
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test-iid", "test-balanced", "test-inverted")
#: The file of :func:`write_splits` with the count of every (y, z) cell of every split.
CELL_COUNTS = "cells.csv"


def binary_codes(values: pd.Series) -> tuple[np.ndarray, tuple]:
    """Code a two-valued column as 0/1 in sorted value order.

    Returns
    -------
    codes, levels
        ``codes[i] == 1`` where ``values[i] == levels[1]``.

    Raises
    ------
    ValueError
        If the column has missing values or not exactly two distinct values.
    """
    if values.isna().any():
        raise ValueError(
            f"column {values.name!r} has {int(values.isna().sum())} missing values; "
            "drop or relabel those rows before building confounded splits"
        )
    levels = tuple(sorted(values.unique(), key=str))
    if len(levels) < 2:
        found = f"only the value '{levels[0]}'" if levels else "no value"
        raise ValueError(
            f"column {values.name!r} has {found} in the rows to split (images whose preprocessing failed are left "
            "out): agreement with the primary label needs both values; include subjects of the other value, or "
            "choose another column"
        )
    if len(levels) != 2:
        shown = ", ".join(str(level) for level in levels[:5])
        shown += f", … ({len(levels)} in all)" if len(levels) > 5 else ""
        if pd.api.types.is_numeric_dtype(values):
            fix = "bin it with a label of the cohort card (as age_group bins age: {edges: [60], names: [young, old]})"
        else:
            fix = "map its values onto two names in a label of the cohort card (values: {a: one, b: one, c: other})"
        raise ValueError(
            f"column {values.name!r} must have exactly two values to define agreement with the primary label, "
            f"found [{shown}]; {fix}, then re-run preprocess into the same --out, which keeps the images and "
            "relabels them"
        )
    return (values.to_numpy() == levels[1]).astype(np.int64), levels


def cell_probabilities(p_primary: float, correlations: Sequence[float]) -> dict[tuple[int, ...], float]:
    """Probability of every cell ``(y, z_1, ..., z_K)`` when ``P(z_k = y | y) = correlations[k]``.

    Factors are independent given ``y``; ``p_primary`` is ``P(y = 1)``.
    """
    probabilities = {}
    for cell in itertools.product((0, 1), repeat=len(correlations) + 1):
        y, zs = cell[0], cell[1:]
        p = p_primary if y == 1 else 1.0 - p_primary
        for z, r in zip(zs, correlations):
            p *= r if z == y else 1.0 - r
        probabilities[cell] = p
    return probabilities


def _check_correlations(spurious: Mapping[str, float]) -> None:
    if not spurious:
        raise ValueError("give at least one spurious factor with its correlation, e.g. {'sex': 0.9}")
    for name, r in spurious.items():
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"correlation of {name!r} must lie in [0, 1], got {r}")


def agreement_pairing(table: pd.DataFrame, primary: str, factor: str) -> dict:
    """Which value of ``factor`` "agrees" with each value of ``primary``.

    The pairing follows the table's own direction of association (agreement ≥ 50 % over the whole
    table), so a requested ``r`` > 0.5 keeps the cells the cohort has most of: UK Biobank is older than
    NAKO, so ``old`` pairs with ``ukb``.

    Returns
    -------
    dict
        ``{primary value: agreeing factor value}`` for both primary values.
    """
    y, y_levels = binary_codes(table[primary])
    z, z_levels = binary_codes(table[factor])
    flipped = float((y == z).mean()) < 0.5
    return {y_levels[0]: z_levels[1 if flipped else 0], y_levels[1]: z_levels[0 if flipped else 1]}


def agreement_codes(table: pd.DataFrame, primary: str, factor: str, pairing: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """0/1 codes of ``primary`` and ``factor`` such that equal codes mean agreement under ``pairing``."""
    positive = list(pairing)[1]
    y = (table[primary].to_numpy() == positive).astype(np.int64)
    z = (table[factor].to_numpy() == pairing[positive]).astype(np.int64)
    return y, z


def select_confounded(
    table: pd.DataFrame,
    primary: str,
    spurious: Mapping[str, float],
    rng: np.random.Generator,
    pairings: Mapping[str, Mapping] | None = None,
) -> pd.DataFrame:
    """Select the largest subset of ``table`` whose cells follow the requested correlations.

    ``P(y)`` is kept as in ``table``; each cell ``(y, z_1..z_K)`` is filled to ``n * p(cell)`` rows,
    with ``n`` as large as the scarcest cell allows after rounding. ``pairings`` (factor → :func:`agreement_pairing`)
    defaults to the pairing of ``table`` itself.

    Fallback: a cell the table has (almost) no rows for is rounded down, to none if need be, rather
    than emptying the set; the agreement then misses the requested ``r`` (at ``r = 0.98`` a pool without
    disagreeing rows gives 1.0). The selection records the requested correlations in
    ``attrs["requested"]``; :func:`cell_counts` reports both, :func:`missed_correlations` the misses.
    """
    _check_correlations(spurious)
    if len(table) == 0:
        empty = table.copy()
        empty.attrs["requested"] = _as_requested(spurious)
        return empty
    pairings = {name: (pairings or {}).get(name) or agreement_pairing(table, primary, name) for name in spurious}
    codes = [agreement_codes(table, primary, name, pairings[name]) for name in spurious]
    y = codes[0][0]
    zs = [z for _, z in codes]
    probabilities = cell_probabilities(float(y.mean()), list(spurious.values()))
    cells = np.stack([y, *zs], axis=1)
    members = {cell: np.flatnonzero((cells == np.array(cell)).all(axis=1)) for cell in probabilities}
    # + 0.5: a cell may round down to what it has, so one rare empty cell does not empty the set
    size = min((len(members[c]) + 0.5) / p for c, p in probabilities.items() if p > 0)
    chosen = [
        rng.choice(members[cell], size=min(len(members[cell]), int(round(size * p))), replace=False)
        for cell, p in probabilities.items()
    ]
    index = np.sort(np.concatenate(chosen))
    selected = table.iloc[index].reset_index(drop=True)
    selected.attrs["agreement"] = {name: dict(pairing) for name, pairing in pairings.items()}
    selected.attrs["requested"] = _as_requested(spurious)
    return selected


def _as_requested(spurious: Mapping[str, float]) -> dict[str, float]:
    # The inverted set's 1.0 - 0.9 is 0.09999999999999998 in binary: record the share as it was asked for.
    # Only the record is rounded; the draws keep the exact value (the stored splits stay as they were).
    return {name: round(float(r), 12) for name, r in spurious.items()}


def assign_confounders(
    primary_codes: np.ndarray, correlations: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """Draw binary spurious factors for subjects with labels ``primary_codes``.

    Returns an ``(N, K)`` array with ``P(z_k = y) = correlations[k]``, independently per factor.
    """
    agree = rng.random((len(primary_codes), len(correlations))) < np.asarray(correlations)[None, :]
    y = np.asarray(primary_codes)[:, None]
    return np.where(agree, y, 1 - y).astype(np.int64)


def subject_pools(
    subjects: Sequence, fractions: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Partition unique subject ids at random into pools of the given fractions."""
    if any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    unique = np.array(sorted(set(subjects), key=str), dtype=object)
    order = unique[rng.permutation(len(unique))]
    bounds = np.round(np.cumsum(fractions)[:-1] * len(order)).astype(int)
    return np.split(order, bounds)


def confounded_splits(
    table: pd.DataFrame,
    primary: str,
    spurious: Mapping[str, float],
    subject_column: str = "subject_id",
    fractions: tuple[float, float, float] = (0.6, 0.1, 0.3),
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Split a manifest by subject into train / val / test-iid / test-balanced / test-inverted.

    Parameters
    ----------
    table
        One row per image, with ``subject_column``, the binary ``primary`` label and each spurious column.
        Rows whose ``status`` (if the table has one) is not ``ok`` are left out: their images failed
        preprocessing, and loading a split drops them, which would make its reported counts wrong.
    primary
        Primary label column.
    spurious
        Spurious column → training correlation ``r`` (probability the factor agrees with ``primary``).
    fractions
        Subject fractions of the train, val and test pools. Each test set draws from the whole test
        pool, so the three may share held-out subjects (never with train or val): disjoint thirds
        leave the inverted set a handful of subjects in a cohort of hundreds.
    seed
        Seed of the subject partition and the row selection.

    Notes
    -----
    A pool that cannot supply a requested correlation gives a set at another one (the fallback of
    :func:`select_confounded`); :func:`missed_correlations` of the :func:`cell_counts` lists them.
    The subject pools depend on the seed alone, the rows drawn from them also on the table's row
    order: sort the table (``mimm-med cohort split`` sorts by subject and image) for splits that
    do not change when the rows come in another order.

    Examples
    --------
    A manifest of 1,000 subjects whose age group, sex and cohort are independent:

    >>> rng = np.random.default_rng(0)
    >>> manifest = pd.DataFrame({"subject_id": [f"s{i}" for i in range(1000)],
    ...                          "age_group": rng.choice(["old", "young"], 1000),
    ...                          "sex": rng.choice(["female", "male"], 1000),
    ...                          "cohort": rng.choice(["nako", "ukb"], 1000)})
    >>> splits = confounded_splits(manifest, "age_group", {"sex": 0.9, "cohort": 0.9})
    >>> {name: len(split) for name, split in splits.items()}
    {'train': 180, 'val': 30, 'test-iid': 81, 'test-balanced': 251, 'test-inverted': 84}

    Each factor agrees with the age group at r in train, val and test-iid, at 0.5 in test-balanced and
    at 1 - r in test-inverted, up to rounding in the small sets (:func:`missed_correlations` lists none):

    >>> cells = cell_counts(splits, "age_group", ["sex", "cohort"])
    >>> agreement = cells.pivot_table(values="agreement", index="split", columns="factor", sort=False)
    >>> agreement.round(2)  # doctest: +NORMALIZE_WHITESPACE
    factor          sex  cohort
    split
    train          0.90    0.90
    val            0.90    0.93
    test-iid       0.91    0.91
    test-balanced  0.50    0.50
    test-inverted  0.10    0.10
    """
    missing = [c for c in (subject_column, primary, *spurious) if c not in table.columns]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}; it has {list(table.columns)}")
    if len(fractions) != 3:
        raise ValueError(f"fractions are (train, val, test), got {tuple(fractions)}")
    if STATUS in table.columns:
        table = table[table[STATUS] == STATUS_OK].reset_index(drop=True)
    if table[subject_column].isna().any():
        raise ValueError(
            f"{int(table[subject_column].isna().sum())} rows have no {subject_column}; without it they cannot be "
            "kept to one split: drop them or give them their subject's id"
        )
    rng = np.random.default_rng(seed)
    train_pool, val_pool, test_pool = subject_pools(table[subject_column].tolist(), fractions, rng)
    inverted = {name: 1.0 - r for name, r in spurious.items()}
    balanced = {name: 0.5 for name in spurious}
    plan = {
        "train": (train_pool, spurious),
        "val": (val_pool, spurious),
        "test-iid": (test_pool, spurious),
        "test-balanced": (test_pool, balanced),
        "test-inverted": (test_pool, inverted),
    }
    subjects = table[subject_column]
    pairings = {name: agreement_pairing(table, primary, name) for name in spurious}
    return {
        split: select_confounded(table[subjects.isin(set(pool))].reset_index(drop=True), primary, target, rng, pairings)
        for split, (pool, target) in plan.items()
    }


def cell_counts(splits: Mapping[str, pd.DataFrame], primary: str, spurious: Sequence[str]) -> pd.DataFrame:
    """Rows per ``(split, factor, primary value, factor value)`` cell, with each split's agreement rate.

    Every cell of every split is listed, empty ones with count 0 (an empty minority cell is what makes
    a split's agreement miss its target). Agreement uses the pairing recorded by :func:`confounded_splits`
    (``frame.attrs["agreement"]``), else the pairing of all splits together; ``requested`` is the
    correlation the split was drawn at (``frame.attrs["requested"]``, NaN where not recorded).
    """
    everything = pd.concat(list(splits.values()), ignore_index=True)
    rows = []
    for name in spurious:
        recorded = [f.attrs.get("agreement", {}).get(name) for f in splits.values()]
        pairing = next((p for p in recorded if p), None) or agreement_pairing(everything, primary, name)
        y_levels = sorted({*everything[primary].dropna(), *pairing}, key=str)
        z_levels = sorted({*everything[name].dropna(), *pairing.values()}, key=str)
        for split, frame in splits.items():
            counts = frame.groupby([primary, name], observed=True).size()
            agree = frame[name].to_numpy() == frame[primary].map(pairing).to_numpy()
            agreement = float(agree.mean()) if len(frame) else float("nan")
            requested = float(frame.attrs.get("requested", {}).get(name, float("nan")))
            for y_value, z_value in itertools.product(y_levels, z_levels):
                rows.append(
                    {"split": split, "factor": name, "primary": y_value, "value": z_value,
                     "count": int(counts.get((y_value, z_value), 0)), "agreement": agreement, "requested": requested}
                )
    return pd.DataFrame(rows, columns=["split", "factor", "primary", "value", "count", "agreement", "requested"])


def missed_correlations(cells: pd.DataFrame, tolerance: float = CORRELATION_TOLERANCE) -> pd.DataFrame:
    """The ``(split, factor)`` rows of :func:`cell_counts` whose agreement misses the requested correlation.

    Missed: off by more than ``tolerance`` and by more than one image of the split (rounding alone
    moves a small set by one), or no image disagrees (agrees) though ``0 < r < 1`` asks for some.
    Empty splits and splits without a recorded request are not listed.

    Returns
    -------
    pandas.DataFrame
        Columns ``split, factor, requested, agreement, images``.
    """
    per_split = cells.groupby(["split", "factor"], sort=False).agg(
        requested=("requested", "first"), agreement=("agreement", "first"), images=("count", "sum")
    ).reset_index()
    known = per_split.dropna(subset=["requested", "agreement"])
    off = (known["agreement"] - known["requested"]).abs()
    one_image = 1.0 / known["images"].clip(lower=1)
    extreme = known["agreement"].isin((0.0, 1.0)) & (known["requested"] > 0.0) & (known["requested"] < 1.0)
    missed = ((off > tolerance + 1e-9) & (off > one_image + 1e-9)) | extreme
    return known[missed].reset_index(drop=True)


def write_splits(
    splits: Mapping[str, pd.DataFrame], out_dir: str | Path, primary: str, spurious: Sequence[str]
) -> pd.DataFrame:
    """Write each split as the manifest ``<out_dir>/<split>.csv`` and its :func:`cell_counts` as ``cells.csv``.

    Returns
    -------
    pandas.DataFrame
        The cell counts.
    """
    out_dir = Path(out_dir)
    for name, frame in splits.items():
        write_manifest(frame, out_dir / f"{name}.csv")
    cells = cell_counts(splits, primary, spurious)
    with atomic_output(out_dir / CELL_COUNTS) as tmp:
        cells.to_csv(tmp, index=False)
    return cells


def cell_balancing_weights(labels: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-sample weights that make every joint cell of ``labels`` equally likely (group rebalancing).

    Feed them to ``torch.utils.data.WeightedRandomSampler``.
    """
    columns = np.stack([np.asarray(v) for v in labels.values()], axis=1)
    _, inverse, counts = np.unique(columns, axis=0, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse.reshape(-1)]
    return weights / weights.sum()


def stratified_partition(datalist: Sequence[Mapping], keys: Sequence[str], seed: int, parts: int) -> list[list]:
    """``datalist`` cut into ``parts`` equal parts (a few records repeated to fill them) sharing every joint cell of ``keys``.

    MONAI's ``partition_dataset`` deals records out in turn; dealt in cell order (each cell in a seeded
    random order), every cell of ``n`` records puts ``n // parts`` or one more into each part. The
    parts of a distributed run: a rebalancing sampler within a part then still draws every cell
    (an unstratified part could miss a rare cell altogether, or hold one image of it).

    Examples
    --------
    Two ranks' parts of 16 records, whose rare cells hold two records each:

    >>> cells = [(0, 0)] * 6 + [(0, 1)] * 2 + [(1, 0)] * 2 + [(1, 1)] * 6
    >>> datalist = [{"image": f"img{i}.png", "digit": y, "thickness": z} for i, (y, z) in enumerate(cells)]
    >>> shards = stratified_partition(datalist, ["digit", "thickness"], seed=0, parts=2)
    >>> [[(record["digit"], record["thickness"]) for record in shard] for shard in shards]  # doctest: +NORMALIZE_WHITESPACE
    [[(0, 0), (0, 0), (0, 0), (0, 1), (1, 0), (1, 1), (1, 1), (1, 1)],
     [(0, 0), (0, 0), (0, 0), (0, 1), (1, 0), (1, 1), (1, 1), (1, 1)]]

    Under ``torch.distributed`` each rank trains on ``shards[torch.distributed.get_rank()]``.

    A cell of fewer records than ``parts`` leaves some parts without it, with a warning naming the
    cell (from rank 0 alone, as every rank computes the same parts); fewer records than ``parts`` in
    all is refused.
    """
    if len(datalist) < parts:
        raise ValueError(
            f"the training set holds {len(datalist)} records, fewer than the {parts} processes it is shared out to: "
            f"launch at most {max(len(datalist), 1)} (torchrun --nproc_per_node) or train on more subjects"
        )
    cell_of = [tuple(record[key] for key in keys) for record in datalist]
    order = np.random.default_rng(seed).permutation(len(datalist))
    by_cell = sorted(order, key=lambda i: cell_of[i])  # stable: random within a cell
    counts = pd.Series(cell_of, dtype=object).value_counts(sort=False)
    for cell, count in counts[counts < parts].items() if is_rank_zero() else ():
        named = ", ".join(f"{key} = {value}" for key, value in zip(keys, cell))
        warnings.warn(
            f"only {count} training record(s) have {named}, fewer than the {parts} processes: {parts - count} of them "
            "train without that cell, and a rebalancing sampler there never draws it; launch fewer processes or "
            "train on more subjects",
            stacklevel=2,
        )
    return partition_dataset([datalist[i] for i in by_cell], num_partitions=parts, even_divisible=True)


def rebalancing_sampler(datalist: Sequence[Mapping], keys: Sequence[str], seed: int = 0) -> WeightedRandomSampler:
    """Sampler drawing ``len(datalist)`` items per epoch with every joint cell of ``keys`` equally likely.

    Examples
    --------
    16 records whose rare cells hold two records each:

    >>> from collections import Counter
    >>> from torch.utils.data import DataLoader
    >>> cells = [(0, 0)] * 6 + [(0, 1)] * 2 + [(1, 0)] * 2 + [(1, 1)] * 6
    >>> datalist = [{"image": f"img{i}.png", "digit": y, "thickness": z} for i, (y, z) in enumerate(cells)]
    >>> sampler = rebalancing_sampler(datalist, ["digit", "thickness"], seed=0)
    >>> loader = DataLoader(datalist, batch_size=4, sampler=sampler)  # a MONAI Dataset in practice
    >>> len(loader)  # an epoch draws as many records as there are
    4
    >>> drawn = Counter(cells[i] for _ in range(1000) for i in sampler)  # 1,000 epochs
    >>> {cell: round(count / 1000) for cell, count in sorted(drawn.items())}  # thousands per cell
    {(0, 0): 4, (0, 1): 4, (1, 0): 4, (1, 1): 4}
    """
    weights = cell_balancing_weights({key: np.array([item[key] for item in datalist]) for key in keys})
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(torch.as_tensor(weights), num_samples=len(datalist), generator=generator)
