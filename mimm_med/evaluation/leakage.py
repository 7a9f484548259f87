"""How much a spurious factor can still be read from frozen primary features."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from mimm_med.mi import ESTIMATORS
from mimm_med.evaluation._arrays import as_class_labels, as_feature_matrix, check_same_length
from mimm_med.evaluation.readout import standardized_logistic_regression

__all__ = ["MIN_ROWS_PER_FOLD", "TooFewRowsError", "linear_probe_leakage", "residual_mutual_information"]

#: Fewest rows per cross-fitting fold that :func:`residual_mutual_information` estimates from (see its Notes).
MIN_ROWS_PER_FOLD = 24


class UndefinedLeakageError(ValueError):
    """The factor does not vary enough in the probed set (one class, or a class of one sample) for :func:`linear_probe_leakage`."""


class TooFewRowsError(ValueError):
    """Too few rows (in a class of ``given``) for the cross-fitted critics of :func:`residual_mutual_information`."""


def linear_probe_leakage(
    features: np.ndarray, z: np.ndarray, seed: int = 0, n_splits: int = 5, max_iter: int = 1000
) -> float:
    """Cross-validated balanced accuracy of a logistic regression predicting ``z`` from ``features``.

    Features are standardised inside each fold, and classes weighted inversely to their frequency
    (the score is balanced accuracy); the out-of-fold predictions of a stratified k-fold are pooled
    and scored once. Chance, i.e. no linearly readable leak, is 1/K for K
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
    >>> rng = np.random.default_rng(0)
    >>> thickness = rng.integers(0, 2, 200)
    >>> digit_features = rng.normal(size=(200, 8))
    >>> round(linear_probe_leakage(digit_features, thickness), 2)  # no trace of thickness: chance
    0.47
    >>> digit_features[:, 0] += 2 * thickness
    >>> round(linear_probe_leakage(digit_features, thickness), 2)
    0.79
    """
    features = as_feature_matrix(features, "features")
    z = as_class_labels(z, "z")
    check_same_length({"features": features, "z": z})
    classes, counts = np.unique(z, return_counts=True)
    if classes.size < 2:
        raise UndefinedLeakageError(
            f"z holds a single class ({classes.tolist()}); leakage is undefined, probe a test set where the "
            "factor varies."
        )
    if counts.min() < 2:
        raise UndefinedLeakageError(
            f"z class {classes[counts.argmin()]} has {counts.min()} sample; the cross-validated probe needs at "
            "least 2 samples per class."
        )
    folds = StratifiedKFold(n_splits=min(n_splits, int(counts.min())), shuffle=True, random_state=seed)
    # Fitted for the score it is read by: an unweighted fit of an imbalanced factor (a 90/10 scanner)
    # mostly predicts the majority class, and its balanced accuracy understates the leak.
    probe = standardized_logistic_regression(max_iter).set_params(logisticregression__class_weight="balanced")
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
    folds: int = 5,
    seed: int = 0,
    device: torch.device | str = "cpu",
    given: np.ndarray | None = None,
) -> float:
    """Mutual information between frozen features, estimated by fresh critics on held-out rows.

    The rows are split into ``folds`` parts, and each part is held out once (cross-fitting): a new
    estimator minimises its ``critic_loss`` on random minibatches of the other parts but one, which
    validates it; every ``eval_every`` steps its validation loss is measured, and training stops once
    that has not improved for ``patience`` checks (or after ``steps``). The critic with the best
    validation loss then estimates MI on the held-out part, in ``batch_size`` chunks, and the result
    is the mean over all rows, so every row counts in the estimate. On test-set-sized data it stays
    noisy: for the stand-in brain's 171 balanced-set rows (16 + 16 features) the standard deviation
    over seeds was 0.06 and 0.21 nats for two factors (0.19 and 0.09 with one held-out fifth), so
    compare estimates over several seeds. Stopping on unseen rows matters: a critic memorises its
    training pairs within a few hundred steps and the held-out estimate falls far below zero, hence
    the small learning rate and frequent checks. Both inputs are standardised with training-row statistics, which leaves
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
        Most optimisation steps per fold.
    batch_size, learning_rate
        Critic training; ``batch_size`` is also the chunk size of the validation and held-out passes.
    eval_every, patience
        Validation period in steps, and how many periods without improvement end training.
    folds
        Parts of the rows, each held out once and used once for validation (at least 3).
    seed
        Seed of the row split, the minibatches and the critics' initialisation.
    device
        Device the critics train on.
    given
        Optional discrete labels ``(N,)``, e.g. y: estimate I(a; b | given) = Σ_c p(c) I(a; b | given = c),
        each term within one class. Features that both carry y (f_z does when its head learnt y as a
        shortcut for z) are dependent through y alone; conditioned on y, that part drops out.

    Returns
    -------
    float
        The estimate in nats (a lower bound for MINE/NWJ/InfoNCE, an upper bound for CLUB, the linear
        part of the dependence for Gaussian).

    Raises
    ------
    TooFewRowsError
        Fewer than :data:`MIN_ROWS_PER_FOLD` rows per fold (per class of ``given``, with ``given``).

    Notes
    -----
    The minimum of 24 rows per fold comes from a measurement with MINE at these defaults on correlated
    Gaussians (:func:`mimm_med.mi.correlated_gaussians`, 4 and 16 dimensions, I = 0 and 1 nat,
    5 seeds each): with 2 to 8 rows per fold estimates reached -3.4e6 to +8.7e3 nats, with 16 one
    of 1 nat came out at -17 nats, and from 24 to 48 rows per fold all 60 stayed within [-0.05, 1.0].
    An 18-image test set (3.6 rows per fold) had given 58.7 and -746 nats.
    ``benchmarks/residual_mi_rows.py`` repeats the measurement.

    Examples
    --------
    Features of which one column correlates with the other's at 1/√2, so that they share
    ln(2)/2 ≈ 0.35 nats; the closed-form ``"gaussian"`` estimator needs no training (``"club"`` or
    ``"mine"`` train critics, which takes seconds to minutes):

    >>> rng = np.random.default_rng(0)
    >>> digit_features = rng.normal(size=(500, 2))
    >>> thickness_features = digit_features[:, :1] + rng.normal(size=(500, 1))
    >>> round(residual_mutual_information(digit_features, thickness_features, "gaussian"), 2)
    0.34
    """
    a = as_feature_matrix(a, "a")
    b = as_feature_matrix(b, "b")
    if given is not None:
        given = as_class_labels(given, "given")
        check_same_length({"a": a, "b": b, "given": given})
        options = dict(estimator=estimator, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                       eval_every=eval_every, patience=patience, folds=folds, seed=seed, device=device)
        classes, counts = np.unique(given, return_counts=True)
        for c, count in zip(classes, counts):  # every class before any critic trains
            try:
                _check_rows(int(count), folds)
            except TooFewRowsError as error:
                # Name the class: "3 rows in 5 folds" alone does not say the shortfall lies in one class of given.
                raise TooFewRowsError(
                    f"given class {c} holds {int(count)} of {given.size} rows: {error}; merge rare "
                    "classes of given, and bin a continuous given first"
                ) from error
        per_class = [
            (np.mean(given == c), residual_mutual_information(a[given == c], b[given == c], **options)) for c in classes
        ]
        return float(sum(share * estimate for share, estimate in per_class))
    build_estimator = _estimator_factory(estimator)
    n_rows = check_same_length({"a": a, "b": b})
    _check_rows(n_rows, folds)
    rng = np.random.default_rng(seed)
    parts = np.array_split(rng.permutation(n_rows), folds)
    device = torch.device(device)
    total = 0.0
    for index, held_out in enumerate(parts):
        validation = parts[(index + 1) % folds]
        train = np.concatenate([part for other, part in enumerate(parts) if other not in (index, (index + 1) % folds)])
        critic = _FoldCritic(a, b, train, device, batch_size)
        total += critic.fit_and_estimate(
            build_estimator, held_out, validation, steps, learning_rate, eval_every, patience, rng, seed + index
        ) * held_out.size
    return total / n_rows


def _check_rows(n_rows: int, folds: int) -> None:
    """Refuse fewer than 3 folds, or fewer than :data:`MIN_ROWS_PER_FOLD` rows per fold."""
    if folds < 3:
        raise ValueError(f"{folds} folds: need at least 3 folds (training, validation and held-out rows)")
    if n_rows < MIN_ROWS_PER_FOLD * folds:
        raise TooFewRowsError(
            f"{n_rows} rows in {folds} folds: the critics need at least {MIN_ROWS_PER_FOLD} rows per fold "
            f"({MIN_ROWS_PER_FOLD * folds} rows) for a usable estimate; use more rows, or fewer folds (at least 3)"
        )


class _FoldCritic:
    """The features of one cross-fitting fold, standardised with its training rows."""

    def __init__(self, a: np.ndarray, b: np.ndarray, train: np.ndarray, device: torch.device, batch_size: int) -> None:
        self.a_rows = _standardised(a, train, device)
        self.b_rows = _standardised(b, train, device)
        self.train = train
        self.device = device
        self.rows_per_batch = min(batch_size, train.size)

    def mean_over_chunks(self, measure: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], chosen: np.ndarray) -> float:
        chunks = np.array_split(chosen, max(1, chosen.size // self.rows_per_batch))
        with torch.no_grad():
            return sum(float(measure(self.a_rows[chunk], self.b_rows[chunk])) * chunk.size for chunk in chunks) / chosen.size

    def fit_and_estimate(
        self,
        build_estimator: Callable[..., torch.nn.Module],
        held_out: np.ndarray,
        validation: np.ndarray,
        steps: int,
        learning_rate: float,
        eval_every: int,
        patience: int,
        rng: np.random.Generator,
        seed: int,
    ) -> float:
        """Train a fresh critic on the training rows, stopping on ``validation``; its estimate on ``held_out``."""
        # manual_seed also reseeds every CUDA generator: fork the device's too, so the caller's draws go on.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            critic = build_estimator(self.a_rows.shape[1], self.b_rows.shape[1]).to(self.device)
            parameters = list(critic.parameters())
            if not parameters:  # a closed-form estimator (GaussianMI) has no critic to fit
                critic.eval()
                return self.mean_over_chunks(critic, held_out)
            optimizer = torch.optim.Adam(parameters, lr=learning_rate)
            best_loss, best_state, checks_without_improvement = float("inf"), copy.deepcopy(critic.state_dict()), 0
            for step in range(1, steps + 1):
                critic.train()
                batch = torch.as_tensor(rng.choice(self.train, size=self.rows_per_batch, replace=False), device=self.device)
                loss = critic.critic_loss(self.a_rows[batch], self.b_rows[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if step % eval_every == 0 or step == steps:
                    critic.eval()
                    validation_loss = self.mean_over_chunks(critic.critic_loss, validation)
                    if validation_loss < best_loss:
                        best_loss, best_state = validation_loss, copy.deepcopy(critic.state_dict())
                        checks_without_improvement = 0
                    else:
                        checks_without_improvement += 1
                    if checks_without_improvement >= patience:
                        break
            critic.load_state_dict(best_state)
            critic.eval()
            return self.mean_over_chunks(critic, held_out)


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
