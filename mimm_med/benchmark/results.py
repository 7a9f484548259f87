"""Results of the benchmark matrix: the long table, mean ± sd summaries, Markdown and plots."""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mimm_med.benchmark.matrix import cell_metrics
from mimm_med.data.writers import atomic_output
from mimm_med.engines import METHODS

#: Columns of ``results.csv``: one row per cell and metric.
COLUMNS: tuple[str, ...] = ("dataset", "method", "correlation", "seed", "test", "metric", "value")
METHOD_ORDER: tuple[str, ...] = (*METHODS, "oracle")
GROUP: list[str] = ["dataset", "method", "correlation"]
#: Headline figures of the Markdown tables: (title, test, metric).
#: Residual MI figures (``--residual-mi``) → their table titles: fresh estimators on the frozen features.
RESIDUAL_MI_TITLES: dict[str, str] = {
    "residual_mi": "residual MI of f_y with f_{z}",
    "residual_mi_given_y": "residual MI of f_y with f_{z} given y",
    "residual_mi_label": "residual MI of f_y with {z}",
}
HEADLINES: tuple[tuple[str, str, str], ...] = (
    ("inverted balanced accuracy", "inverted", "y_bacc"),
    ("inverted worst-group accuracy", "inverted", "worst_group_acc"),
    # Threshold-free: a model can rank the inverted set well while its decision threshold sits off.
    ("inverted AUROC", "inverted", "y_auroc"),
)


def long_format(results: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per cell and figure, with the columns :data:`COLUMNS`.

    A figure ``<test>/<metric>`` of :func:`~mimm_med.benchmark.matrix.cell_metrics` splits at its first
    ``/``: ``inverted/sex/tpr_gap`` becomes test ``inverted``, metric ``sex/tpr_gap``.
    """
    rows = []
    for result in results:
        cell = result["cell"]
        for name, value in cell_metrics(result).items():
            test, metric = name.split("/", 1)
            rows.append((cell["dataset"], cell["method"], cell["correlation"], cell["seed"], test, metric, value))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def summarize(frame: pd.DataFrame, test: str, metric: str) -> pd.DataFrame:
    """Mean, sample standard deviation and count over seeds of one figure, per data set × method × correlation.

    Missing values (NaN) are left out; the sd of a single seed is NaN. Methods come in :data:`METHOD_ORDER`.
    """
    selected = _select(frame, test, metric)
    return selected.groupby(GROUP, observed=True)["value"].agg(mean="mean", sd="std", n="count").reset_index()


def correlation_drop(frame: pd.DataFrame, test: str = "inverted", metric: str = "y_bacc") -> pd.DataFrame:
    """Per data set and method: the figure at the lowest minus at the highest correlation, mean ± sd over seeds.

    The drop is taken per seed (the same seed at both correlations) before averaging; a data set and
    method run at one correlation only has no row.
    """
    rows = []
    for (dataset, method), group in _select(frame, test, metric).groupby(["dataset", "method"], observed=True):
        low, high = group["correlation"].min(), group["correlation"].max()
        if low == high:
            continue
        # reindexed: pivot_table leaves out a correlation whose figure is NaN for every seed
        by_seed = group.pivot_table(index="seed", columns="correlation", values="value").reindex(columns=[low, high])
        drops = (by_seed[low] - by_seed[high]).dropna()
        rows.append({"dataset": dataset, "method": method, "low": low, "high": high,
                     "mean": drops.mean(), "sd": drops.std(), "n": len(drops)})  # fmt: skip
    return pd.DataFrame(rows, columns=["dataset", "method", "low", "high", "mean", "sd", "n"])


def oracle_gap(frame: pd.DataFrame, test: str = "inverted", metric: str = "y_bacc") -> pd.DataFrame:
    """Per data set, method and correlation: the figure minus the oracle's, mean ± sd over seeds.

    The evaluation protocol's headline: how far a method trained on the shortcut stays below the oracle trained
    without it, on the same test sets. The gap is taken per seed (each method's seed against the
    oracle's same seed) before averaging; negative is below the oracle. Data sets without an oracle
    have no rows.
    """
    selected = _select(frame, test, metric)
    keys = ["dataset", "correlation", "seed"]
    oracle = selected.loc[selected["method"] == "oracle", [*keys, "value"]].rename(columns={"value": "oracle"})
    paired = selected[selected["method"] != "oracle"].merge(oracle, on=keys, how="inner")
    gaps = paired.assign(gap=paired["value"] - paired["oracle"]).dropna(subset=["gap"])
    return gaps.groupby(GROUP, observed=True)["gap"].agg(mean="mean", sd="std", n="count").reset_index()


def ordered_methods(methods: pd.Series) -> pd.Categorical:
    """Methods as an ordered categorical: :data:`METHOD_ORDER` first, unknown names after, sorted."""
    present = set(methods)
    known = [m for m in METHOD_ORDER if m in present]
    return pd.Categorical(methods, categories=known + sorted(present - set(known)), ordered=True)


def _select(frame: pd.DataFrame, test: str, metric: str) -> pd.DataFrame:
    selected = frame[(frame["test"] == test) & (frame["metric"] == metric)]
    return selected.assign(method=ordered_methods(selected["method"]))


def mean_sd(mean: float, sd: float, scale: float = 100.0, digits: int = 1) -> str:
    """``"78.1 ± 2.3"`` (percent, one decimal by default); the mean alone when sd is undefined (one seed)."""
    if pd.isna(mean):
        return "–"
    return f"{scale * mean:.{digits}f}" if pd.isna(sd) else f"{scale * mean:.{digits}f} ± {scale * sd:.{digits}f}"


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def summary_table(summary: pd.DataFrame, scale: float = 100.0, digits: int = 1) -> list[str]:
    """Markdown rows of one data set's summary: a row per method, a column per correlation (:func:`mean_sd` cells)."""
    correlations = sorted(summary["correlation"].unique())
    cells = {(row.method, row.correlation): mean_sd(row.mean, row.sd, scale, digits) for row in summary.itertuples()}
    methods = list(dict.fromkeys(summary["method"]))
    rows = [[method, *(cells.get((method, r), "–") for r in correlations)] for method in methods]
    return _markdown_table(["method", *(f"r = {r:g}" for r in correlations)], rows)


def leakage_factors(frame: pd.DataFrame, dataset: str, test: str = "leakage") -> list[str]:
    """Spurious factors of ``dataset`` with a ``test`` figure (leakage by default), in first-seen order."""
    rows = frame[(frame["dataset"] == dataset) & (frame["test"] == test)]
    return list(dict.fromkeys(rows["metric"]))


def results_markdown(
    frame: pd.DataFrame, plots: Mapping[str, Sequence[str]] | None = None, command: str | None = None
) -> str:
    """The benchmark page: per data set the headline tables and plots, then the drop per method.

    Parameters
    ----------
    frame
        :func:`long_format` results.
    plots
        Data set → links of its plots, as the page should write them.
    command
        The command that produced the results, quoted on the page.
    """
    lines = ["# Shortcut benchmark", ""]
    if command:
        lines += ["Produced by", "", "```", command, "```", ""]
    lines += [
        "Percent, mean ± sd over seeds (the mean alone for one seed). Train and val at correlation r, test sets "
        "at r (iid), 0.5 (balanced) and 1 − r (inverted); the oracle trains at r = 0.5 and is tested on the "
        "same sets. Leakage: balanced accuracy of a linear probe on f_y predicting the factor on the balanced "
        "set (50 is ideal). Gap to the oracle: a method's inverted balanced accuracy minus the oracle's, seed by "
        "seed, in points (0 is the ceiling). A balanced accuracy of 50.0 beside an AUROC far from 50 means the "
        "model puts every image in one class while its scores still rank them (undertrained, as in `--quick`, or collapsed).",
        "",
    ]
    for dataset in dict.fromkeys(frame["dataset"]):
        subset = frame[frame["dataset"] == dataset]
        lines += [f"## {dataset}", "", _sizes_line(subset), "", *_diverged_line(subset)]
        headlines = [*HEADLINES, *((f"leakage of {z}", "leakage", z) for z in leakage_factors(frame, dataset))]
        for title, test, metric in headlines:
            lines += [f"### {title}", "", *summary_table(summarize(subset, test, metric)), ""]
        gap = oracle_gap(subset)
        if len(gap):
            lines += ["### gap to the oracle, inverted balanced accuracy (points)", "", *summary_table(gap), ""]
        for test, title in RESIDUAL_MI_TITLES.items():  # with --residual-mi
            for z in leakage_factors(frame, dataset, test):
                lines += [f"### {title.format(z=z)} (nats)", "", *summary_table(summarize(subset, test, z), 1.0, 3), ""]
        lines += [f"![{Path(link).stem}]({link})" for link in (plots or {}).get(dataset, [])]
        lines += [""]
    drops = correlation_drop(frame)
    if len(drops):
        lines += ["## Drop of inverted balanced accuracy from the lowest to the highest r (points)", "", *_drop_table(frame, drops), ""]
    return "\n".join(lines)


def _drop_table(frame: pd.DataFrame, drops: pd.DataFrame) -> list[str]:
    """A column per data set, headed by its methods' most common r range (the widest of a tie); a cell over another names it."""
    datasets = [d for d in dict.fromkeys(frame["dataset"]) if d in set(drops["dataset"])]
    ranges = {}
    for dataset in datasets:
        counts = drops[drops["dataset"] == dataset].value_counts(["low", "high"])
        ranges[dataset] = max(counts.index, key=lambda pair: (counts[pair], pair[1] - pair[0]))
    cells = {}
    for row in drops.itertuples():
        own = "" if (row.low, row.high) == ranges[row.dataset] else f" (r = {row.low:g} → {row.high:g})"
        cells[(row.dataset, row.method)] = mean_sd(row.mean, row.sd) + own
    methods = list(ordered_methods(drops["method"]).categories)
    rows = [[method, *(cells.get((d, method), "–") for d in datasets)] for method in methods]
    header = [f"{d}, r = {ranges[d][0]:g} → {ranges[d][1]:g}" for d in datasets]
    return _markdown_table(["method", *header], rows)


def _sizes_line(subset: pd.DataFrame) -> str:
    """Records per split at each correlation (the stand-in cohorts shrink as r grows)."""
    sizes = subset[(subset["test"] == "data") & (subset["method"] != "oracle")]
    means = sizes.groupby(["correlation", "metric"])["value"].mean().unstack()
    parts = [
        f"r = {r:g}: {row.get('n_train', math.nan):.0f} train, {row.get('n_test-inverted', math.nan):.0f} inverted test"
        for r, row in means.iterrows()
    ]
    return "Records: " + "; ".join(parts) + "." if parts else ""


def _diverged_line(subset: pd.DataFrame) -> list[str]:
    """The cells whose training diverged (they have no figures), if any."""
    rows = subset[(subset["test"] == "train") & (subset["metric"] == "diverged") & (subset["value"] > 0)]
    cells = [f"{row.method} at r = {row.correlation:g}, seed {row.seed}" for row in rows.itertuples()]
    return [f"Training diverged (loss NaN; no figures): {'; '.join(cells)}.", ""] if cells else []


def _lines(axes: Axes, summary: pd.DataFrame, ylabel: str, title: str) -> None:
    """One line per method over the correlations, error bars ± sd over seeds, chance level dashed."""
    for method, rows in summary.groupby("method", observed=True):
        error = 100 * rows["sd"].fillna(0)
        axes.errorbar(rows["correlation"], 100 * rows["mean"], yerr=error, marker="o", capsize=3, label=method)
    axes.axhline(50, color="grey", lw=0.8, ls="--")
    axes.set(xlabel="training correlation r", ylabel=ylabel, title=title)
    axes.grid(alpha=0.3)


def plot_vs_correlation(frame: pd.DataFrame, dataset: str, out_dir: str | Path) -> list[Path]:
    """``inverted_vs_correlation_<dataset>.png`` and ``leakage_vs_correlation_<dataset>.png``: a line per method.

    A plot without figures to show (every cell of the data set diverged) is not made.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subset = frame[frame["dataset"] == dataset]
    paths = []
    summary = summarize(subset, "inverted", "y_bacc")
    if len(summary):  # none where every cell of the data set diverged
        inverted = Figure(figsize=(6, 4.5), layout="tight")
        axes = inverted.subplots()
        _lines(axes, summary, "inverted balanced accuracy (%)", f"{dataset}: shortcut inverted")
        axes.legend(fontsize=8)
        paths.append(out_dir / f"inverted_vs_correlation_{dataset}.png")
        with atomic_output(paths[-1]) as tmp:
            inverted.savefig(tmp, dpi=120)
    factors = leakage_factors(frame, dataset)
    if factors:
        leakage = Figure(figsize=(5 * len(factors), 4.5), layout="tight")
        all_axes = leakage.subplots(1, len(factors), squeeze=False)[0]
        for axes, factor in zip(all_axes, factors):
            _lines(axes, summarize(subset, "leakage", factor), "linear-probe balanced accuracy (%)", f"{dataset}: {factor} in f_y")
        all_axes[-1].legend(fontsize=8)
        paths.append(out_dir / f"leakage_vs_correlation_{dataset}.png")
        with atomic_output(paths[-1]) as tmp:
            leakage.savefig(tmp, dpi=120)
    return paths


def write_results(
    results: Iterable[Mapping[str, Any]], out: str | Path, command: str | None = None, docs: str | Path | None = None
) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and the plots of every data set into ``out``.

    With ``docs`` (e.g. ``docs/results.md``) the same page is also published there, its plots copied to
    the folder of the same name (``docs/results/``). Every file is written atomically: a write that is
    interrupted (Ctrl-C, a full disk) leaves the file as it was, never a truncated table or page.

    Returns
    -------
    dict
        Name → path of every file written.
    """
    out = Path(out)
    frame = long_format(results)
    paths = {"csv": out / "results.csv", "markdown": out / "results.md"}
    with atomic_output(paths["csv"]) as tmp:
        frame.to_csv(tmp, index=False)
    plots = {dataset: plot_vs_correlation(frame, dataset, out) for dataset in dict.fromkeys(frame["dataset"])}
    links = {dataset: [path.name for path in files] for dataset, files in plots.items()}
    _write_text(paths["markdown"], results_markdown(frame, links, command) + "\n")
    paths.update({path.stem: path for files in plots.values() for path in files})
    if docs is not None:
        docs = Path(docs)
        plot_dir = docs.with_suffix("")
        plot_dir.mkdir(parents=True, exist_ok=True)
        for files in plots.values():
            for path in files:
                with atomic_output(plot_dir / path.name) as tmp:
                    shutil.copyfile(path, tmp)
        links = {dataset: [f"{plot_dir.name}/{path.name}" for path in files] for dataset, files in plots.items()}
        _write_text(docs, results_markdown(frame, links, command) + "\n")
        paths["docs"] = docs
    return paths


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`~mimm_med.data.writers.atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
