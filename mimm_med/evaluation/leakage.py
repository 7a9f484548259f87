"""How much a spurious factor can still be read from frozen primary features."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mimm_med.mi import ESTIMATORS
from mimm_med.evaluation._arrays import as_class_labels, as_feature_matrix, check_same_length

__all__ = ["linear_probe_leakage", "residual_mutual_information"]


def linear_probe_leakage(
    features: np.ndarray, z: np.ndarray, seed: int = 0, n_splits: int = 5, max_iter: int = 1000
) -> float:
    """Cross-validated balanced accuracy of a logistic regression predicting ``z`` from ``features``.

    Features are standardised inside each fold; the out-of-fold predictions of a stratified
    k-fold are pooled and scored once. Chance, i.e. no linearly readable leak, is 1/K for K
    classes (0.5 for binary z). On tiny sets the number of folds drops to the smallest class size.

    Parameters
    ----------
    features
        Frozen primary features ``f_y``, ``(N, D)``.
    z
        Class labels ``(N,)`` of one spurious factor; continuous factors must be binned first.
    seed
        Seed of the fold split.
    n_splits
        Folds of the cross-validation at most.
    max_iter
        Iterations of the logistic-regression solver.

    Examples
    --------
    >>> linear_probe_leakage(outputs["digit_features"], outputs["thickness_label"])
    0.54
    """
    features = as_feature_matrix(features, "features")
    z = as_class_labels(z, "z")
    check_same_length({"features": features, "z": z})
    classes, counts = np.unique(z, return_counts=True)
    if classes.size < 2:
        raise ValueError(
            f"z holds a single class ({classes.tolist()}); leakage is undefined, probe a test set where the "
            "factor varies."
        )
    if counts.min() < 2:
        raise ValueError(
            f"z class {classes[counts.argmin()]} has {counts.min()} sample; the cross-validated probe needs at "
            "least 2 samples per class."
        )
    folds = StratifiedKFold(n_splits=min(n_splits, int(counts.min())), shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    predicted = cross_val_predict(probe, features, z, cv=folds)
    return float(balanced_accuracy_score(z, predicted))


def residual_mutual_information(
    a: np.ndarray,
    b: np.ndarray,
    estimator: str | Callable[[int, int], torch.nn.Module] = "mine",
    steps: int = 5000,
    batch_size: int = 256,
    learning_rate: float = 1e-4,
    eval_every: int = 10,
    patience: int = 20,
    held_out_fraction: float = 0.2,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> float:
    """Mutual information between frozen features, estimated by a fresh critic on held-out rows.

    The rows are split into training, validation and held-out parts. A new estimator minimises
    its ``critic_loss`` on random training minibatches with Adam; every ``eval_every`` steps its
    loss on the validation rows is measured, and training stops once that has not improved for
    ``patience`` checks (or after ``steps``). The critic with the best validation loss then
    estimates MI on the held-out rows, averaged over ``batch_size`` chunks. Stopping on unseen
    rows matters: on test-set-sized data a critic memorises its training pairs within a few
    hundred steps and the held-out estimate falls far below zero, hence the small learning rate
    and frequent checks. Both inputs are standardised with training-row statistics, which leaves
    MI unchanged and eases the optimisation. Estimates for independent features scatter around 0
    and can be slightly negative; CLUB, an upper bound, exceeds the true MI of dependent features.

    Parameters
    ----------
    a, b
        Frozen features ``(N, D_a)`` and ``(N, D_b)`` (1-D arrays are single columns), e.g.
        ``f_y`` and ``f_z``.
    estimator
        A name of :data:`mimm_med.mi.ESTIMATORS` (``"mine"``, ``"nwj"``, ``"infonce"``, ``"club"``;
        ``"gaussian"`` needs no training and is evaluated on the held-out rows at once), or any
        callable ``(dim_a, dim_b) -> estimator`` following the MI estimator contract.
    steps
        Most optimisation steps.
    batch_size, learning_rate
        Critic training; ``batch_size`` is also the chunk size of the validation and held-out passes.
    eval_every, patience
        Validation period in steps, and how many periods without improvement end training.
    held_out_fraction
        Share of rows for the final estimate, and again for validation.
    seed
        Seed of the row split, the minibatches and the critic initialisation.
    device
        Device the critic trains on.

    Returns
    -------
    float
        The estimate in nats (a lower bound for MINE/NWJ/InfoNCE, an upper bound for CLUB, the linear
        part of the dependence for Gaussian).

    Examples
    --------
    >>> residual_mutual_information(outputs["digit_features"], outputs["thickness_features"], "club")
    0.03
    """
    build_estimator = _estimator_factory(estimator)
    a = as_feature_matrix(a, "a")
    b = as_feature_matrix(b, "b")
    n_rows = check_same_length({"a": a, "b": b})
    rng = np.random.default_rng(seed)
    rows = rng.permutation(n_rows)
    n_held_out = int(round(n_rows * held_out_fraction))
    if n_held_out < 2 or n_rows - 2 * n_held_out < 2:
        raise ValueError(
            f"{n_rows} rows with held_out_fraction={held_out_fraction} leave {n_rows - 2 * n_held_out} training, "
            f"{n_held_out} validation and {n_held_out} held-out rows; each needs at least 2."
        )
    held_out, validation, train = np.split(rows, [n_held_out, 2 * n_held_out])
    device = torch.device(device)
    a_rows = _standardised(a, train, device)
    b_rows = _standardised(b, train, device)
    rows_per_batch = min(batch_size, train.size)

    def mean_over_chunks(measure: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], chosen: np.ndarray) -> float:
        chunks = np.array_split(chosen, max(1, chosen.size // rows_per_batch))
        with torch.no_grad():
            return sum(float(measure(a_rows[chunk], b_rows[chunk])) * chunk.size for chunk in chunks) / chosen.size

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        critic = build_estimator(a.shape[1], b.shape[1]).to(device)
        parameters = list(critic.parameters())
        if not parameters:  # a closed-form estimator (GaussianMI) has no critic to fit
            critic.eval()
            return mean_over_chunks(critic, held_out)
        optimizer = torch.optim.Adam(parameters, lr=learning_rate)
        best_loss, best_state, checks_without_improvement = float("inf"), copy.deepcopy(critic.state_dict()), 0
        for step in range(1, steps + 1):
            critic.train()
            batch = torch.as_tensor(rng.choice(train, size=rows_per_batch, replace=False), device=device)
            loss = critic.critic_loss(a_rows[batch], b_rows[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % eval_every == 0 or step == steps:
                critic.eval()
                validation_loss = mean_over_chunks(critic.critic_loss, validation)
                if validation_loss < best_loss:
                    best_loss, best_state = validation_loss, copy.deepcopy(critic.state_dict())
                    checks_without_improvement = 0
                else:
                    checks_without_improvement += 1
                if checks_without_improvement >= patience:
                    break
        critic.load_state_dict(best_state)
        critic.eval()
        return mean_over_chunks(critic, held_out)


def _estimator_factory(estimator: str | Callable[[int, int], torch.nn.Module]) -> Callable[..., torch.nn.Module]:
    if callable(estimator):
        return estimator
    if estimator.lower() not in ESTIMATORS:
        raise ValueError(
            f"unknown estimator {estimator!r}; choose one of {sorted(ESTIMATORS)} or pass a callable "
            "(dim_a, dim_b) -> estimator."
        )
    return ESTIMATORS[estimator.lower()]


def _standardised(values: np.ndarray, train: np.ndarray, device: torch.device) -> torch.Tensor:
    mean, std = values[train].mean(axis=0), values[train].std(axis=0)
    # Constant columns keep scale 1 rather than dividing by zero.
    scale = np.where(std > 0, std, 1.0)
    return torch.as_tensor((values - mean) / scale, dtype=torch.float32, device=device)
