"""What a linear read-out of frozen features can reach on a shifted test set.

A penalty on f_y can at best make the primary head ignore the spurious factors; it cannot add
to what the features encode. These read-outs measure that ceiling on trained features: a head
refitted on training data from which every linear trace of the factors was erased, and a head
refitted on balanced data (deep feature reweighting, Kirichenko et al., ICLR 2023).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from mimm_med.evaluation._arrays import as_class_labels, as_feature_matrix, check_same_length

__all__ = ["conditional_mean_eraser", "fit_linear_readout", "linear_readout_accuracy", "standardized_logistic_regression"]


def conditional_mean_eraser(
    features: np.ndarray,
    primary: np.ndarray,
    factors: Mapping[str, np.ndarray],
    strata: np.ndarray | None = None,
) -> np.ndarray:
    """Orthogonal projector that equalizes each factor's class means within every primary class.

    The projector removes the span of the differences ``mean(x | y, z_k = c) - mean(x | y, z_k = c0)``
    over every primary class ``y``, factor ``z_k`` and factor class ``c``. On the data it was fitted
    to, no linear function of the projected features then differs in mean between the classes of a
    factor once the primary class is fixed: the first-moment version of ``f ⊥ z_k | y``.

    With ``strata``, the differences are taken within each stratum and primary class, and the span
    of all of them is removed. Give the source of each row, e.g. training vs held-out subjects: a
    network encodes a factor differently in the images it memorized, and on the stand-in brain the
    within-class sex difference of unseen subjects that a training-set eraser leaves
    (cosine 0.74-0.90 between validation and test sets) is what a probe reads on the test set.

    Parameters
    ----------
    features
        ``(N, D)`` frozen features.
    primary
        ``(N,)`` primary class labels.
    factors
        Spurious factor name → ``(N,)`` class labels.
    strata
        Optional ``(N,)`` labels of groups whose differences are measured apart (``None``: one group).

    Returns
    -------
    numpy.ndarray
        ``(D, D)`` symmetric projector; apply as ``features @ projector``.

    Examples
    --------
    Eight feature columns mixing y and two binary factors:

    >>> rng = np.random.default_rng(0)
    >>> y, z1, z2 = rng.integers(0, 2, (3, 500))
    >>> mixing = rng.normal(size=(4, 8))
    >>> train_features = np.stack([y, z1, z2, y + z1], axis=1) @ mixing + rng.normal(size=(500, 8))
    >>> projector = conditional_mean_eraser(train_features, y, {"thickness": z1, "rotation": z2})
    >>> projector.shape, int(np.linalg.matrix_rank(projector))  # one direction removed per (y, factor)
    ((8, 8), 4)
    >>> erased = train_features @ projector
    >>> gap = erased[(y == 1) & (z1 == 1)].mean(0) - erased[(y == 1) & (z1 == 0)].mean(0)
    >>> bool(np.abs(gap).max() < 1e-12)
    True
    """
    features = as_feature_matrix(features, "features")
    primary = as_class_labels(primary, "primary")
    factors = {name: as_class_labels(values, name) for name, values in factors.items()}
    strata = np.zeros(len(primary), dtype=np.int64) if strata is None else as_class_labels(strata, "strata")
    check_same_length({"features": features, "primary": primary, "strata": strata, **factors})
    differences = []
    for stratum, y in np.unique(np.stack([strata, primary], axis=1), axis=0):
        in_class = (strata == stratum) & (primary == y)
        for z in factors.values():
            present = np.unique(z[in_class])
            means = [features[in_class & (z == c)].mean(axis=0) for c in present]
            differences += [mean - means[0] for mean in means[1:]]
    projector = np.eye(features.shape[1])
    if not differences:
        return projector
    basis, singular, _ = np.linalg.svd(np.stack(differences, axis=1), full_matrices=False)
    # Directions below round-off are not differences the data shows; removing them would only cost signal.
    basis = basis[:, singular > singular.max() * features.shape[1] * np.finfo(features.dtype).eps]
    return projector - basis @ basis.T


def standardized_logistic_regression(max_iter: int = 3000) -> Pipeline:
    """The unfitted linear read-out of frozen features: a ``StandardScaler`` then a ``LogisticRegression``."""
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))


def fit_linear_readout(
    features: np.ndarray, labels: np.ndarray, sample_weight: np.ndarray | None = None, max_iter: int = 3000
) -> Pipeline:
    """:func:`standardized_logistic_regression` of ``labels`` on ``features``, fitted.

    ``sample_weight`` is rescaled to mean one: scikit-learn weights the loss but not the penalty, so
    weights that sum to one (:func:`~mimm_med.data.confounding.cell_balancing_weights`) would scale
    the regularization up N-fold.
    """
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, dtype=np.float64)
        sample_weight = sample_weight / sample_weight.mean()
    readout = standardized_logistic_regression(max_iter)
    return readout.fit(features, labels, logisticregression__sample_weight=sample_weight)


def linear_readout_accuracy(
    fit_features: np.ndarray,
    fit_labels: np.ndarray,
    score_sets: Mapping[str, tuple[np.ndarray, np.ndarray]],
    sample_weight: np.ndarray | None = None,
    max_iter: int = 3000,
) -> dict[str, float]:
    """Accuracy on each score set of one standardized logistic regression fitted on the fit set.

    Parameters
    ----------
    fit_features, fit_labels
        ``(N, D)`` features and ``(N,)`` labels the read-out is fitted on.
    score_sets
        Name → ``(features (M, D), labels (M,))`` of each set it is scored on.
    sample_weight
        Optional ``(N,)`` weights of the fit samples (e.g. cell-balancing weights; any scale).
    max_iter
        Iterations of the solver.

    Examples
    --------
    Features with a weak trace of y and a strong one of a shortcut z, which agrees with y at rate ``r``:

    >>> rng = np.random.default_rng(0)
    >>> def features_and_labels(r, n=400):
    ...     y = rng.integers(0, 2, n)
    ...     z = np.where(rng.random(n) < r, y, 1 - y)
    ...     return np.stack([y, 3 * z], axis=1) + rng.normal(size=(n, 2)), y
    >>> iid, balanced, inverted = features_and_labels(0.9), features_and_labels(0.5), features_and_labels(0.1)
    >>> linear_readout_accuracy(*iid, {"inverted": inverted})  # fitted where z predicts y, it reads z
    {'inverted': 0.2475}
    >>> linear_readout_accuracy(*balanced, {"inverted": inverted})
    {'inverted': 0.645}
    """
    fit_features = as_feature_matrix(fit_features, "fit_features")
    fit_labels = as_class_labels(fit_labels, "fit_labels")
    check_same_length({"fit_features": fit_features, "fit_labels": fit_labels})
    scored = {}
    for name, (features, labels) in score_sets.items():
        features, labels = as_feature_matrix(features, f"{name} features"), as_class_labels(labels, f"{name} labels")
        check_same_length({f"{name} features": features, f"{name} labels": labels})
        if features.shape[1] != fit_features.shape[1]:
            raise ValueError(
                f"fit features have {fit_features.shape[1]} columns but {name} features {features.shape[1]}; "
                "read both from the same layer."
            )
        scored[name] = (features, labels)
    readout = fit_linear_readout(fit_features, fit_labels, sample_weight, max_iter)
    return {name: float(readout.score(features, labels)) for name, (features, labels) in scored.items()}
