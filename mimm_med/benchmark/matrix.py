"""The benchmark matrix: methods × data sets × correlations × seeds, one stored JSON per finished cell.

A cell trains one method on one data set at one training correlation and seed and scores it with the
evaluation protocol (:mod:`mimm_med.evaluation.protocol`). Its result is written to ``<out>/cells/<key>.json`` as soon as it is
done, so an interrupted benchmark resumes where it stopped: a re-run loads finished cells instead of
training them again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mimm_med.benchmark.datasets import BenchmarkData, BenchmarkDataset
from mimm_med.data.writers import atomic_output
from mimm_med.engines import PENALTY_METHODS, TrainingDiverged
from mimm_med.evaluation import flatten_metrics
from mimm_med.experiment import ExperimentConfig, run_experiment

#: The matrix of Mueller & Berens (2026) plus MIMM, MIMM-X and the oracle.
DEFAULT_METHODS: tuple[str, ...] = ("erm", "rebalance", *PENALTY_METHODS, "oracle")
#: Each penalty also combined with group rebalancing (``--with-rebalance``).
REBALANCED_METHODS: tuple[str, ...] = tuple(f"{name}+rebalance" for name in PENALTY_METHODS)


#: Options recorded with a cell that are no ExperimentConfig fields: they change its figures (the
#: residual-MI metrics, the stand-in cohorts' size) but not its training.
RECORDED_ONLY: tuple[str, ...] = ("residual_mi", "scale")


class StaleCellError(ValueError):
    """A stored cell cannot be reused: it was run with other settings than the benchmark that finds it, or is damaged."""


def transform_name(transform: Callable | None) -> str | None:
    """What a cell stores of its training augmentation: the transforms' class names, or None.

    Examples
    --------
    >>> from mimm_med.data.digits_morpho import digits_augmentation
    >>> transform_name(digits_augmentation())
    'RandAffined'
    """
    if transform is None:
        return None
    return "+".join(type(step).__name__ for step in getattr(transform, "transforms", [transform]))


@dataclass(frozen=True)
class Cell:
    """One entry of the matrix."""

    dataset: str
    method: str
    correlation: float
    seed: int

    @property
    def key(self) -> str:
        """File-name-safe identifier, e.g. ``digits_mimmx_r0.9_seed0``."""
        return f"{self.dataset}_{self.method}_r{self.correlation:g}_seed{self.seed}"


def plan_cells(
    datasets: Sequence[str], methods: Sequence[str], correlations: Sequence[float], seeds: Sequence[int]
) -> list[Cell]:
    """Every cell, ordered so that consecutive cells share a data set, correlation and seed (one split)."""
    return [
        Cell(dataset, method, correlation, seed)
        for dataset in datasets
        for correlation in correlations
        for seed in seeds
        for method in methods
    ]


def run_cell(
    cell: Cell,
    data: BenchmarkData,
    options: Mapping[str, Any],
    residual_mi: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train and evaluate one cell.

    Parameters
    ----------
    data
        The cell's splits, from :meth:`BenchmarkDataset.data` (train and val at r = 0.5 for the oracle).
    options
        :class:`~mimm_med.experiment.ExperimentConfig` fields shared by every cell (epochs, mi_weight, …),
        and the :data:`RECORDED_ONLY` settings the cells are stored with.
    residual_mi
        Passed to :func:`~mimm_med.experiment.run_experiment` (``None``: no residual MI).

    Returns
    -------
    dict
        ``cell``, ``options``, ``config``, ``train_transform`` (:func:`transform_name`), ``seconds``
        (training), ``sizes`` (records per split),
        ``history`` (per-epoch training means), ``metrics`` (:func:`~mimm_med.evaluation.flatten_metrics`)
        and ``diverged``: the :class:`~mimm_med.engines.TrainingDiverged` message, or ``None``. A diverged
        cell is a result too (no metrics, NaN seconds): rerunning it with the same seed diverges again.
    """
    training = {key: value for key, value in options.items() if key not in RECORDED_ONLY}
    config = ExperimentConfig(**{**data.config_defaults, **training, "method": cell.method, "seed": cell.seed})
    result = {
        "cell": asdict(cell),
        "options": dict(options),
        "config": asdict(config),
        "train_transform": transform_name(data.train_transform),
        "seconds": math.nan,
        "sizes": {name: len(records) for name, records in data.sets.items()},
        "history": [],
        "metrics": {},
        "diverged": None,
    }
    try:
        run = run_experiment(
            data.sets,
            data.primary,
            data.spurious,
            data.num_classes,
            config,
            spatial_dims=data.spatial_dims,
            in_channels=data.in_channels,
            transform=data.train_transform,
            residual_mi=residual_mi,
        )
    except TrainingDiverged as error:
        return {**result, "diverged": str(error)}
    return {**result, "seconds": run["seconds"], "history": run["history"], "metrics": flatten_metrics(run["results"])}


def cell_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """Every figure of a cell result under a ``<test>/<metric>`` name.

    The evaluation metrics (``inverted/y_bacc``, ``leakage/sex``, …), plus ``train/seconds``,
    ``train/diverged`` (1 or 0) and the records per split ``data/n_<split>``.
    """
    metrics = {**result["metrics"], "train/seconds": result["seconds"]}
    metrics["train/diverged"] = result["diverged"] is not None
    metrics.update({f"data/n_{split}": size for split, size in result["sizes"].items()})
    return {name: float(value) for name, value in metrics.items()}


def cell_path(out: str | Path, cell: Cell) -> Path:
    """Where a finished cell is stored."""
    return Path(out) / "cells" / f"{cell.key}.json"


def save_cell(path: Path, result: Mapping[str, Any]) -> None:
    """Write a cell result atomically (an interrupted write never looks finished)."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")


def load_cell(path: Path, cell: Cell, options: Mapping[str, Any], train_transform: str | None = None) -> dict[str, Any]:
    """Read the finished ``cell`` from ``path`` and check it was run with the same ``options`` and training augmentation.

    ``train_transform`` is the :func:`transform_name` of the augmentation this benchmark uses for the
    cell's data set; cells stored before augmentation was recorded count as not augmented.

    Raises
    ------
    StaleCellError
        If the file is damaged, holds another cell's result, or the stored options or augmentation
        differ: mixing them into one table would be silently wrong.
    """
    # the benchmark writes cells atomically, so only a damaged, copied or hand-edited file fails here
    remedy = "delete it and that cell is run again"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StaleCellError(f"{path} is not a readable cell ({error}); {remedy}") from None
    if not isinstance(result, dict):
        raise StaleCellError(f"{path} is no cell result (not a JSON object); {remedy}")
    missing = [key for key in ("cell", "options") if key not in result]
    if missing:
        raise StaleCellError(f"{path} is no cell result (it lacks {missing}); {remedy}")
    stored, holds = (result["options"], result.get("train_transform")), result["cell"]
    if holds != asdict(cell):
        raise StaleCellError(f"{path} holds the result of another cell, {holds}, not of {asdict(cell)}; {remedy}")
    if stored != (dict(options), train_transform):
        raise StaleCellError(
            f"{path} was run with {result['options']} and training augmentation {stored[1]}, this benchmark "
            f"uses {dict(options)} and {train_transform}; give another --out folder, or delete that folder's "
            "cells/ to start over"
        )
    return result


def stored_cells(
    cells: Iterable[Cell], datasets: Mapping[str, BenchmarkDataset], out: str | Path, options: Mapping[str, Any]
) -> dict[Cell, dict[str, Any]]:
    """The results of the ``cells`` already stored under ``out``, each checked by :func:`load_cell`.

    Raises
    ------
    StaleCellError
        If one is damaged, another cell's, or was run with other settings.
    """
    cells = list(cells)
    augmentation = {name: transform_name(datasets[name].train_transform()) for name in {cell.dataset for cell in cells}}
    return {
        cell: load_cell(cell_path(out, cell), cell, options, augmentation[cell.dataset])
        for cell in cells
        if cell_path(out, cell).exists()
    }


def run_matrix(
    cells: Iterable[Cell],
    datasets: Mapping[str, BenchmarkDataset],
    out: str | Path,
    options: Mapping[str, Any],
    residual_mi: Mapping[str, Any] | None = None,
    on_result: Callable[[dict], Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every cell not yet stored under ``out`` and return the results of all cells, in order.

    Parameters
    ----------
    on_result
        Called with the result of every cell, finished now or before (e.g. to log it to MLflow); the
        fields it returns, if any, are added to the result and stored with it.
    progress
        Show a progress bar over the cells to run, with ETA.

    Examples
    --------
    A smoke run: one cell, one epoch of a tiny network on 32 digits per split (``mimm-med benchmark``
    trains 20 epochs on all 1,797 digits):

    >>> import tempfile
    >>> from mimm_med.benchmark.datasets import DigitsData
    >>> out = tempfile.mkdtemp()
    >>> cells = plan_cells(["digits"], ["erm"], [0.9], [0])
    >>> smoke = {"epochs": 1, "batch_size": 16, "backbone_kwargs": {"channels": [4]}}
    >>> results = run_matrix(cells, {"digits": DigitsData(limit=32)}, out, smoke, progress=False)
    >>> [(result["cell"]["method"], result["sizes"]["train"], result["diverged"]) for result in results]
    [('erm', 32, None)]
    >>> sorted(path.name for path in Path(out, "cells").iterdir())
    ['digits_erm_r0.9_seed0.json']

    Run again, the stored cell is loaded instead of trained:

    >>> again = run_matrix(cells, {"digits": DigitsData(limit=32)}, out, smoke, progress=False)
    >>> again[0]["seconds"] == results[0]["seconds"]
    True
    """
    cells = list(cells)
    # Every stored cell is read first: one of other settings stops the run before any training, not hours in.
    stored = stored_cells(cells, datasets, out, options)
    todo = [cell for cell in cells if cell not in stored]
    for name in dict.fromkeys(cell.dataset for cell in todo):
        datasets[name].prepare()
    bar = tqdm(total=len(todo), unit="cell", disable=not progress or not todo, dynamic_ncols=True)
    results = []
    split_key, data = None, None
    with bar:
        for cell in cells:
            path = cell_path(out, cell)
            if cell in stored:
                result = stored[cell]
            else:
                bar.set_postfix_str(cell.key)
                oracle = cell.method == "oracle"
                # Consecutive cells share their splits (see plan_cells): draw them once.
                if split_key != (cell.dataset, cell.correlation, cell.seed, oracle):
                    split_key = (cell.dataset, cell.correlation, cell.seed, oracle)
                    data = datasets[cell.dataset].data(cell.correlation, cell.seed, oracle)
                result = run_cell(cell, data, options, residual_mi)
                save_cell(path, result)
                bar.update()
            extra = on_result(result) if on_result is not None else None
            if extra:
                result.update(extra)
                save_cell(path, result)
            results.append(result)
    return results

