"""Evaluation of shortcut mitigation: metrics per test set and group, leakage of spurious factors
into the primary features, and plots. Everything works on plain arrays, as gathered by
:func:`collect_outputs`."""

from mimm_med.evaluation.leakage import linear_probe_leakage, residual_mutual_information
from mimm_med.evaluation.metrics import as_probabilities, classification_report, switched_heads
from mimm_med.evaluation.outputs import collect_outputs
from mimm_med.evaluation.plots import plot_group_accuracy, plot_training_curves, plot_tsne
from mimm_med.evaluation.protocol import evaluate_test_sets, flatten_metrics, results_table
from mimm_med.evaluation.readout import conditional_mean_eraser, fit_linear_readout, linear_readout_accuracy

__all__ = [
    "as_probabilities",
    "classification_report",
    "collect_outputs",
    "conditional_mean_eraser",
    "evaluate_test_sets",
    "fit_linear_readout",
    "flatten_metrics",
    "linear_probe_leakage",
    "linear_readout_accuracy",
    "plot_group_accuracy",
    "plot_training_curves",
    "plot_tsne",
    "residual_mutual_information",
    "results_table",
    "switched_heads",
]
