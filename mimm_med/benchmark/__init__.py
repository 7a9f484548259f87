"""The shortcut benchmark matrix: methods × data sets × correlations × seeds (``mimm-med benchmark``).

- :mod:`~mimm_med.benchmark.datasets`: adapters that give the five confounded splits of a data set
  for a correlation r and a seed (Digits-Morpho, stand-in brain MRI, stand-in chest X-ray);
- :mod:`~mimm_med.benchmark.matrix`: the resumable runner, one stored JSON per finished cell;
- :mod:`~mimm_med.benchmark.results`: the long results table, mean ± sd summaries, Markdown and plots;
- :mod:`~mimm_med.benchmark.tracking`: MLflow parent and per-cell runs.

Examples
--------
Two methods on Digits-Morpho at two correlations; training the four cells takes some 20 s on CPU,
hence not run as a test (:func:`~mimm_med.benchmark.matrix.run_matrix` shows a smoke run that is):

>>> datasets = make_datasets(["digits"], cache="data/benchmark")  # the stand-ins' cache; digits need none
>>> cells = plan_cells(["digits"], ["erm", "mimmx"], [0.9, 0.98], seeds=[0])
>>> [cell.key for cell in cells]
['digits_erm_r0.9_seed0', 'digits_mimmx_r0.9_seed0', 'digits_erm_r0.98_seed0', 'digits_mimmx_r0.98_seed0']
>>> results = run_matrix(cells, datasets, "out/benchmark", {"epochs": 5})  # doctest: +SKIP
>>> write_results(results, "out/benchmark")["markdown"]  # doctest: +SKIP
PosixPath('out/benchmark/results.md')
"""

from mimm_med.benchmark.datasets import (
    ADAPTERS,
    SCALES,
    BenchmarkData,
    BenchmarkDataset,
    BrainStandinData,
    ChestXrayStandinData,
    DigitsData,
    ManifestData,
    make_datasets,
)
from mimm_med.benchmark.matrix import (
    DEFAULT_METHODS,
    REBALANCED_METHODS,
    Cell,
    StaleCellError,
    cell_metrics,
    plan_cells,
    run_cell,
    run_matrix,
    stored_cells,
)
from mimm_med.benchmark.results import (
    COLUMNS,
    correlation_drop,
    long_format,
    mean_sd,
    oracle_gap,
    plot_vs_correlation,
    results_markdown,
    summarize,
    write_results,
)
from mimm_med.benchmark.tracking import BenchmarkTracker

__all__ = [
    "ADAPTERS",
    "COLUMNS",
    "DEFAULT_METHODS",
    "REBALANCED_METHODS",
    "SCALES",
    "BenchmarkData",
    "BenchmarkDataset",
    "BenchmarkTracker",
    "BrainStandinData",
    "Cell",
    "StaleCellError",
    "ChestXrayStandinData",
    "DigitsData",
    "ManifestData",
    "cell_metrics",
    "correlation_drop",
    "long_format",
    "make_datasets",
    "mean_sd",
    "oracle_gap",
    "plan_cells",
    "plot_vs_correlation",
    "results_markdown",
    "run_cell",
    "run_matrix",
    "stored_cells",
    "summarize",
    "write_results",
]
