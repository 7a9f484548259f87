"""Erase the spurious factors' linear traces from f_y and refit the primary head, during or after training."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from mimm_med.data.confounding import cell_balancing_weights
from mimm_med.distributed import gathered_rows
from mimm_med.evaluation.outputs import collect_outputs
from mimm_med.evaluation.readout import conditional_mean_eraser, fit_linear_readout


class InvariantHeadRefit:
    """Ignite handler: erase the spurious factors' linear traces from f_y and refit the linear primary head.

    Over ``loader`` (the training set, in order) it gathers f_y and the labels and finds the
    projector that removes every direction in which a spurious factor's class means differ within a
    primary class (:func:`~mimm_med.evaluation.conditional_mean_eraser`), in the training set and,
    measured apart, in ``held_out_loader``: images the network was not trained on show how it
    encodes the factors of new subjects, which the memorized training images do not (stand-in brain,
    2,000 subjects per cohort, MIMM-X, seed 0: a probe reads sex from the test set's erased f_y at 57.9 %
    with the training set's differences alone, 53.6 % with the validation set's too). The projector is folded
    into the f_y rows of the network's shared layer, so f_y itself is erased (what leakage probes,
    switched heads and the MI critics see), and a standardized logistic regression of the primary
    label on the erased f_y, with cell-balancing weights, is copied into the primary head. Both are
    changed in place. The backbone and the spurious parts and heads do not change.

    Attached to a trainer it refits once, when training completes. With ``temporary=True``, attach
    it to the validator: it refits when each validation starts and restores the trained weights when
    it completes, so validation and the best checkpoint see the refitted head while training goes
    on from its own weights (training on from a refitted head, whose weights are scaled to
    standardized features, made the primary loss diverge: 0.6 to 463 in ten epochs of the stand-in
    brain bundle).

    Where the MI penalty leaves linear traces of the factors in f_y, the trained head reads them
    (the stand-in brain's MIMM-X head scores 13 % on an inverted test half, a read-out of its erased
    f_y 100 %; ``docs/mi-penalty-diagnosis.md``). The erasure holds in the training set's cell
    means, so it needs every (y, z_k) cell populated there.

    Under ``torch.distributed`` each rank's loaders yield its own part of the set (e.g.
    ``monai.data.partition_dataset``); the ranks' features are gathered, so every rank fits the
    same head on all of it, after one forward pass over its part instead of over the whole set.

    Parameters
    ----------
    loader
        Batches of MONAI dicts holding ``"image"`` and every label; no resampling (rebalancing is
        the weights' job). Under ``torch.distributed``, this rank's part of them.
    primary
        Name of the primary task (a classification head).
    spurious
        Names of the spurious factors (classification labels).
    temporary
        Refit for the length of each run of the engine (a validator) and restore the weights after
        it, instead of once when the engine (a trainer) completes.
    held_out_loader
        Optional batches of images outside the training set, e.g. the validation set, whose factor
        differences are erased too; the head is fitted on ``loader`` alone. Leave it out where the
        same images score the refitted network (a validator's own data), or their labels shape
        what is scored. Under ``torch.distributed``, this rank's part of them.

    Examples
    --------
    Two-feature "images" in which a shortcut z agrees with y in 90 % of the samples, and an ERM
    trainer that refits the primary head when it completes:

    >>> import numpy as np, torch
    >>> from monai.data import DataLoader
    >>> from mimm_med.engines import MIMMXObjective, MIMMXTrainer
    >>> from mimm_med.networks import MIMMXNet
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 2, 400)
    >>> z = np.where(rng.random(400) < 0.9, y, 1 - y)
    >>> images = np.float32(np.stack([y, 3 * z], axis=1) + rng.normal(size=(400, 2)))
    >>> loader = DataLoader([{"image": x, "y": a, "z": b} for x, a, b in zip(images, y, z)], batch_size=100)
    >>> net = MIMMXNet(torch.nn.Flatten(), {"y": 2, "z": 2}, {"y": 2, "z": 2}, backbone_dim=2)
    >>> objective = MIMMXObjective.for_network("erm", net)
    >>> trainer = MIMMXTrainer("cpu", 2, loader, net, torch.optim.Adam(net.parameters(), 0.05), objective)
    >>> InvariantHeadRefit(loader, "y", ["z"]).attach(trainer)
    >>> trainer.run()

    Within each class of y, the mean of f_y no longer differs between the classes of z:

    >>> f_y = net(torch.as_tensor(images))["y_features"].detach().numpy()
    >>> gaps = [f_y[(y == c) & (z == 1)].mean(0) - f_y[(y == c) & (z == 0)].mean(0) for c in (0, 1)]
    >>> bool(np.abs(gaps).max() < 1e-5)
    True

    On a validator, ``temporary=True`` refits for each validation and then restores the trained weights:

    >>> from monai.engines import SupervisedEvaluator
    >>> from mimm_med.engines import OutputKeyInferer
    >>> evaluator = SupervisedEvaluator("cpu", loader, net, inferer=OutputKeyInferer("y_output"))
    >>> InvariantHeadRefit(loader, "y", ["z"], temporary=True).attach(evaluator)
    >>> trained = net.heads["y"].weight.clone()
    >>> evaluator.run()
    >>> torch.equal(net.heads["y"].weight, trained)
    True
    """

    def __init__(
        self,
        loader: Iterable[dict[str, Any]],
        primary: str,
        spurious: Sequence[str],
        temporary: bool = False,
        held_out_loader: Iterable[dict[str, Any]] | None = None,
    ) -> None:
        if not spurious:
            raise ValueError("InvariantHeadRefit needs at least one spurious factor to erase")
        self.loader = loader
        self.primary = primary
        self.spurious = list(spurious)
        self.temporary = temporary
        self.held_out_loader = held_out_loader
        self._trained: dict[str, dict[str, torch.Tensor]] | None = None

    def attach(self, engine: Engine) -> None:
        if self.temporary:
            engine.add_event_handler(Events.STARTED, self._refit_for_run)
            engine.add_event_handler(Events.COMPLETED, self._restore_trained)
        else:
            engine.add_event_handler(Events.COMPLETED, self._refit_for_run)

    def _refit_for_run(self, engine: Engine) -> None:
        network = getattr(engine.network, "module", engine.network)
        if self.temporary:
            self._trained = {
                name: {key: value.detach().clone() for key, value in module.state_dict().items()}
                for name, module in self._changed_modules(network).items()
            }
        self.refit(network)

    def _restore_trained(self, engine: Engine) -> None:
        if self._trained is None:
            return
        network = getattr(engine.network, "module", engine.network)
        for name, module in self._changed_modules(network).items():
            module.load_state_dict(self._trained[name])
        self._trained = None

    def _changed_modules(self, network: torch.nn.Module) -> dict[str, torch.nn.Module]:
        return {"shared_layer": network.shared_layer, "head": network.heads[self.primary]}

    def refit(self, network: torch.nn.Module) -> None:
        """Erase f_y in ``network.shared_layer`` and refit ``network.heads[primary]``, in place, on ``loader``.

        Raises
        ------
        ValueError
            If the primary head is not a linear classification head, or a (y, z_k) cell of the
            training set is empty.
        """
        head, layer = network.heads[self.primary], network.shared_layer
        classes = network.num_classes[self.primary]
        if classes < 2 or not isinstance(head, torch.nn.Linear):
            raise ValueError(
                f"InvariantHeadRefit needs a linear classification head; {self.primary!r} has {head} "
                f"for {classes} class(es) (MIMMXNet(head_hidden=0) and at least 2 classes)"
            )
        features, labels, factors = self._features_and_labels(network, self.loader)
        present = np.unique(labels)
        if not np.array_equal(present, np.arange(classes)):
            raise ValueError(f"the training set holds {self.primary} classes {present.tolist()}, the head {classes}")
        for name, values in factors.items():
            for y in present:
                missing = sorted(int(c) for c in set(np.unique(values)) - set(np.unique(values[labels == y])))
                if missing:
                    raise ValueError(
                        f"no training sample has {self.primary} = {y} with {name} = {missing}: the factor cannot be "
                        "erased without that cell; split at a correlation below 1"
                    )
        projector = self._eraser(network, features, labels, factors)
        projected = features @ projector
        scaler, regression = fit_linear_readout(projected, labels, cell_balancing_weights({"y": labels, **factors}))
        # score = coef · ((f P − mean) / scale) + intercept, folded into one linear map of f.
        coef = regression.coef_ / scaler.scale_
        weight = coef @ projector.T
        bias = regression.intercept_ - coef @ scaler.mean_
        if classes == 2:  # one score s; logits (0, s) give softmax = sigmoid(s) for class 1
            weight = np.concatenate([np.zeros_like(weight), weight])
            bias = np.concatenate([np.zeros_like(bias), bias])
        start = sum(network.part_sizes[: network.part_names.index(self.primary)])
        rows = slice(start, start + features.shape[1])
        erase = torch.as_tensor(projector, dtype=layer.weight.dtype, device=layer.weight.device)
        with torch.no_grad():
            # f_y = W_y b + c_y becomes f_y P = (P W_y) b + P c_y (P symmetric).
            layer.weight[rows] = erase @ layer.weight[rows]
            layer.bias[rows] = erase @ layer.bias[rows]
            head.weight.copy_(torch.as_tensor(weight))
            head.bias.copy_(torch.as_tensor(bias))

    def _features_and_labels(
        self, network: torch.nn.Module, loader: Iterable[dict[str, Any]]
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        outputs = collect_outputs(network, loader, [self.primary, *self.spurious], network.heads[self.primary].weight.device)
        keys = [f"{self.primary}_features", *(f"{name}_label" for name in [self.primary, *self.spurious])]
        outputs = gathered_rows({key: outputs[key] for key in keys})
        features = outputs[f"{self.primary}_features"].astype(np.float64)
        factors = {name: outputs[f"{name}_label"].astype(int) for name in self.spurious}
        return features, outputs[f"{self.primary}_label"].astype(int), factors

    def _eraser(
        self, network: torch.nn.Module, features: np.ndarray, labels: np.ndarray, factors: dict[str, np.ndarray]
    ) -> np.ndarray:
        """The projector from the training set's differences and, measured apart, the held-out set's."""
        if self.held_out_loader is None:
            return conditional_mean_eraser(features, labels, factors)
        held_features, held_labels, held_factors = self._features_and_labels(network, self.held_out_loader)
        strata = np.concatenate([np.zeros(len(labels), dtype=int), np.ones(len(held_labels), dtype=int)])
        return conditional_mean_eraser(
            np.concatenate([features, held_features]),
            np.concatenate([labels, held_labels]),
            {name: np.concatenate([values, held_factors[name]]) for name, values in factors.items()},
            strata,
        )
