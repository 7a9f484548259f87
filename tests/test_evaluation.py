"""Tests of mimm_med.evaluation against small cases whose numbers are worked out by hand."""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from mimm_med import mi
from mimm_med.data.confounding import cell_balancing_weights
from mimm_med.evaluation import (
    classification_report,
    collect_outputs,
    conditional_mean_eraser,
    evaluate_test_sets,
    fit_linear_readout,
    flatten_metrics,
    linear_probe_leakage,
    linear_readout_accuracy,
    plot_group_accuracy,
    plot_training_curves,
    plot_tsne,
    residual_mutual_information,
    results_table,
    switched_heads,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Binary hand case: 6 negatives, 4 positives, thresholded at 0.5.
#   predictions  0 0 0 0 1 1 | 1 1 0 1   -> 7 of 10 correct
#   AUROC: positives 0.8 and 0.9 beat all 6 negatives, 0.35 beats 3, 0.55 beats 4 -> 19 / 24
Y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
P_POSITIVE = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 0.35, 0.55])
# z cells: y0_z0 4/4, y0_z1 0/2, y1_z0 1/2, y1_z1 2/2
Z = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 0])
# w cells: y0_w0 3/3, y0_w1 1/3, y1_w0 1/1, y1_w1 2/3
W = np.array([0, 0, 0, 1, 1, 1, 0, 1, 1, 1])


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def binary_probabilities() -> np.ndarray:
    return np.stack([1 - P_POSITIVE, P_POSITIVE], axis=1)


def png_written(path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_SIGNATURE


def test_classification_report_binary_hand_case():
    report = classification_report(Y, binary_probabilities(), {"w": W, "z": Z})

    assert report["n_samples"] == 10
    assert report["accuracy"] == pytest.approx(0.7)
    assert report["balanced_accuracy"] == pytest.approx((4 / 6 + 3 / 4) / 2)
    assert report["auroc"] == pytest.approx(19 / 24)
    assert report["factors"]["z"]["group_accuracy"] == pytest.approx(
        {"y0_z0": 1.0, "y0_z1": 0.0, "y1_z0": 0.5, "y1_z1": 1.0}
    )
    assert report["factors"]["z"]["group_size"] == {"y0_z0": 4, "y0_z1": 2, "y1_z0": 2, "y1_z1": 2}
    assert report["factors"]["w"]["group_accuracy"] == pytest.approx(
        {"y0_z0": 1.0, "y0_z1": 1 / 3, "y1_z0": 1.0, "y1_z1": 2 / 3}
    )
    assert report["notes"] == []


def test_worst_group_picks_the_lowest_cell_per_factor_and_overall():
    report = classification_report(Y, binary_probabilities(), {"w": W, "z": Z})

    assert report["factors"]["w"]["worst_group"] == "y0_z1"
    assert report["factors"]["w"]["worst_group_accuracy"] == pytest.approx(1 / 3)
    assert report["factors"]["z"]["worst_group"] == "y0_z1"
    assert report["factors"]["z"]["worst_group_accuracy"] == pytest.approx(0.0)
    # The lowest cell sits in the second factor given: the overall minimum must look across factors.
    assert report["worst_group"] == "z/y0_z1"
    assert report["worst_group_accuracy"] == pytest.approx(0.0)


def test_tpr_gap_binary_hand_case():
    report = classification_report(Y, binary_probabilities(), {"w": W, "z": Z})

    # TPR of y = 1: z0 1/2, z1 2/2; w0 1/1, w1 2/3.
    assert report["factors"]["z"]["tpr_gap"] == pytest.approx(0.5)
    assert report["factors"]["w"]["tpr_gap"] == pytest.approx(1 / 3)


def test_tpr_gap_multiclass_is_mean_of_per_class_gaps():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    z = np.array([0, 0, 1, 1] * 3)
    predicted = np.array([0, 0, 0, 1, 1, 0, 1, 1, 2, 2, 2, 2])
    logits = 5.0 * np.eye(3)[predicted]

    report = classification_report(y, logits, {"z": z})

    # class 0: TPR 1 vs 1/2, class 1: 1/2 vs 1, class 2: 1 vs 1 -> gaps 0.5, 0.5, 0.
    assert report["factors"]["z"]["tpr_gap"] == pytest.approx(1 / 3)
    assert report["accuracy"] == pytest.approx(10 / 12)
    probabilities = torch.softmax(torch.as_tensor(logits), dim=1).numpy()
    assert report["auroc"] == pytest.approx(roc_auc_score(y, probabilities, multi_class="ovr", average="macro"))


def test_logits_and_probabilities_give_the_same_report():
    logits = np.stack([np.zeros(10), np.log(P_POSITIVE / (1 - P_POSITIVE))], axis=1)

    report = classification_report(Y, logits, {"z": Z})

    assert report["auroc"] == pytest.approx(19 / 24)
    assert report["accuracy"] == pytest.approx(0.7)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_single_class_gives_nan_auroc_with_a_note():
    y = np.array([1, 1, 1])
    probabilities = np.array([[0.2, 0.8], [0.7, 0.3], [0.1, 0.9]])

    report = classification_report(y, probabilities, {"z": np.array([0, 1, 1])})

    assert math.isnan(report["auroc"])
    assert any("single class" in note for note in report["notes"])
    assert report["accuracy"] == pytest.approx(2 / 3)
    # predictions 1 0 1: TPR 1/1 for z = 0, 1/2 for z = 1.
    assert report["factors"]["z"]["tpr_gap"] == pytest.approx(0.5)


def test_multiclass_auroc_over_present_classes_notes_the_missing_one():
    y = np.array([0, 0, 1, 1])
    probabilities = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1]])

    report = classification_report(y, probabilities)

    # class 0 vs rest: 0.6, 0.2 against 0.1, 0.5 -> 3 of 4 pairs ranked right; class 1: 0.8, 0.4 vs 0.3, 0.5 -> 3 of 4.
    # Class 2 has no positives and must not enter the mean (it would make it NaN).
    assert report["auroc"] == pytest.approx(0.75)
    assert any("2 of 3 classes" in note for note in report["notes"])


def test_classification_report_refuses_continuous_groups_and_bad_shapes():
    with pytest.raises(ValueError, match="bin a continuous factor"):
        classification_report(Y, binary_probabilities(), {"age": np.linspace(20, 80, 10)})
    with pytest.raises(ValueError, match="lengths differ"):
        classification_report(Y, binary_probabilities(), {"z": Z[:-1]})
    with pytest.raises(ValueError, match="np.stack"):
        classification_report(Y, P_POSITIVE)


def test_switched_heads_hand_case():
    head_outputs = np.array([[0.0, 2.0], [1.0, 3.0], [2.0, -1.0], [0.5, 0.0], [-2.0, 2.0]])  # predicts 1 1 0 0 1
    z = np.array([1, 0, 0, 1, 1])

    assert switched_heads(head_outputs, z) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="share class indices"):
        switched_heads(head_outputs, np.array([0, 1, 2, 0, 1]))


def test_linear_probe_finds_a_planted_leak():
    rng = np.random.default_rng(0)
    z = rng.integers(0, 2, 300)
    features = rng.normal(size=(300, 8))
    features[:, 3] += 4.0 * z

    assert linear_probe_leakage(features, z) > 0.95


def test_linear_probe_reports_chance_without_a_leak():
    rng = np.random.default_rng(1)
    z = rng.integers(0, 2, 300)
    features = rng.normal(size=(300, 8))

    assert abs(linear_probe_leakage(features, z) - 0.5) < 0.1


def test_linear_probe_on_tiny_and_degenerate_sets():
    z = np.array([0, 1, 0, 1, 0, 1])
    features = np.stack([10.0 * z + np.arange(6) * 0.01, np.ones(6)], axis=1)

    assert linear_probe_leakage(features, z) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="single class"):
        linear_probe_leakage(features, np.ones(6))
    with pytest.raises(ValueError, match="at least 2 samples per class"):
        linear_probe_leakage(features, np.array([0, 0, 0, 0, 0, 1]))


def shortcut_features(n: int, agreement: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A weak y signal, a strong z signal and a mix, with z agreeing with y at the given rate."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    z = np.where(rng.random(n) < agreement, y, 1 - y)
    noise = rng.normal(size=(n, 4))
    features = np.stack([y + 0.8 * noise[:, 0], 3.0 * z + 0.3 * noise[:, 1], noise[:, 2], y + z + noise[:, 3]], axis=1)
    return features, y, z


def test_conditional_mean_eraser_equalizes_factor_means_within_each_class():
    features, y, z = shortcut_features(2000, 0.9, seed=0)
    rng = np.random.default_rng(1)
    features = np.concatenate([features, rng.normal(size=(len(y), 4))], axis=1)
    w = rng.integers(0, 3, len(y))  # a three-class factor with no signal
    projector = conditional_mean_eraser(features, y, {"z": z, "w": w})
    erased = features @ projector

    np.testing.assert_allclose(projector, projector.T, atol=1e-12)
    np.testing.assert_allclose(projector @ projector, projector, atol=1e-10)
    for label in (0, 1):
        for factor in (z, w):
            means = [erased[(y == label) & (factor == c)].mean(axis=0) for c in np.unique(factor)]
            for mean in means[1:]:
                np.testing.assert_allclose(mean, means[0], atol=1e-9)
    # Without the eraser the factor's mean difference within a class is large.
    assert abs(features[(y == 0) & (z == 1), 1].mean() - features[(y == 0) & (z == 0), 1].mean()) > 2.5
    # Only the span of the 2 classes x (1 + 2) differences is removed: 8 - 6 directions are kept.
    assert np.trace(projector) == pytest.approx(2.0)


def test_conditional_mean_eraser_with_strata_equalizes_means_in_every_stratum():
    # The factor sits in column 1 in the first stratum and in column 2 in the second, which is small:
    # pooled, its differences are swamped; measured apart, both directions go.
    features, y, z = shortcut_features(2000, 0.9, seed=0)
    held_out, y_held, z_held = shortcut_features(200, 0.9, seed=3)
    held_out[:, [1, 2]] = held_out[:, [2, 1]]
    stacked, labels, factor = np.concatenate([features, held_out]), np.concatenate([y, y_held]), np.concatenate([z, z_held])
    strata = np.repeat([0, 1], [len(y), len(y_held)])

    def largest_gap(projector: np.ndarray, stratum: int) -> float:
        erased, in_stratum = stacked @ projector, strata == stratum
        return max(
            np.abs(erased[in_stratum & (labels == c) & (factor == 1)].mean(0) - erased[in_stratum & (labels == c) & (factor == 0)].mean(0)).max()
            for c in (0, 1)
        )

    apart = conditional_mean_eraser(stacked, labels, {"z": factor}, strata=strata)
    pooled = conditional_mean_eraser(stacked, labels, {"z": factor})

    assert largest_gap(apart, 0) < 1e-9 and largest_gap(apart, 1) < 1e-9
    assert largest_gap(pooled, 1) > 1.0  # the held-out stratum's factor survives pooling
    np.testing.assert_allclose(conditional_mean_eraser(features, y, {"z": z}, strata=np.zeros(len(y))),
                               conditional_mean_eraser(features, y, {"z": z}), atol=1e-12)  # fmt: skip
    with pytest.raises(ValueError, match="strata"):
        conditional_mean_eraser(features, y, {"z": z}, strata=np.zeros(len(y) - 1))


def test_erased_readout_escapes_the_shortcut_that_a_plain_readout_takes():
    features, y, z = shortcut_features(2000, 0.9, seed=0)
    inverted, y_inverted, _ = shortcut_features(1000, 0.1, seed=2)

    plain = linear_readout_accuracy(features, y, {"inverted": (inverted, y_inverted)})["inverted"]
    projector = conditional_mean_eraser(features, y, {"z": z})
    erased = linear_readout_accuracy(features @ projector, y, {"inverted": (inverted @ projector, y_inverted)})["inverted"]

    assert plain < 0.4
    assert erased > 0.65
    with pytest.raises(ValueError, match="same layer"):
        linear_readout_accuracy(features, y, {"inverted": (inverted[:, :3], y_inverted)})


def gaussian_features(mi_nats: float, seed: int, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    a, b = mi.correlated_gaussians(n, 4, mi_nats, torch.Generator().manual_seed(seed))
    return a.numpy(), b.numpy()


def test_residual_mutual_information_recovers_known_mi_with_mine():
    dependent = residual_mutual_information(*gaussian_features(1.0, seed=0), estimator="mine")
    independent = residual_mutual_information(*gaussian_features(0.0, seed=1), estimator="mine")

    assert dependent == pytest.approx(1.0, abs=0.3)
    assert abs(independent) < 0.1


def test_residual_mutual_information_with_club_bounds_from_above():
    # For Gaussians with an exact q(b | a), CLUB is sum_k rho^2 / (1 - rho^2) = 4 (e^0.5 - 1) = 2.6 nats here.
    dependent = residual_mutual_information(*gaussian_features(1.0, seed=0), estimator="club")
    independent = residual_mutual_information(*gaussian_features(0.0, seed=1), estimator="club")

    assert dependent > 1.0
    assert abs(independent) < 0.1


def test_residual_mutual_information_takes_an_estimator_factory_and_is_seeded():
    small_mine = functools.partial(mi.MINE, hidden_dim=32)
    features = gaussian_features(1.0, seed=0, n=400)

    first = residual_mutual_information(*features, estimator=small_mine, steps=300, learning_rate=1e-3)

    assert 0.5 < first < 1.3
    assert residual_mutual_information(*features, estimator=small_mine, steps=300, learning_rate=1e-3) == first



@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))],
)
def test_residual_mutual_information_leaves_the_callers_random_draws_alone(device):
    features = gaussian_features(1.0, seed=0, n=120)
    torch.manual_seed(7)
    expected = torch.rand(3, device=device)
    torch.manual_seed(7)
    residual_mutual_information(*features, estimator="mine", steps=20, device=device)
    assert torch.equal(torch.rand(3, device=device), expected)

def test_residual_mutual_information_given_y_drops_the_dependence_that_passes_through_y():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    shared_style = rng.normal(size=2000)
    # Both carry y (f_z's head took y as a shortcut for z); only the second pair shares more than y.
    through_y = (3.0 * y + rng.normal(size=2000), 3.0 * y + rng.normal(size=2000))
    beyond_y = (3.0 * y + shared_style + 0.5 * rng.normal(size=2000), shared_style + 0.5 * rng.normal(size=2000))

    marginal = residual_mutual_information(*through_y, estimator="gaussian")
    conditional = residual_mutual_information(*through_y, estimator="gaussian", given=y)
    conditional_beyond = residual_mutual_information(*beyond_y, estimator="gaussian", given=y)

    assert marginal > 0.25  # correlation 2.25 / 3.25: 0.33 nats
    assert abs(conditional) < 0.01
    assert conditional_beyond > 0.3  # correlation 0.8 within each class: 0.51 nats
    with pytest.raises(ValueError, match="given"):
        residual_mutual_information(*through_y, estimator="gaussian", given=y[:10])


def test_residual_mutual_information_refuses_unknown_estimators_and_tiny_sets():
    a, b = gaussian_features(0.5, seed=0, n=20)
    with pytest.raises(ValueError, match="unknown estimator"):
        residual_mutual_information(a, b, estimator="kde")
    with pytest.raises(ValueError, match="at least 24 rows per fold"):
        residual_mutual_information(a[:5], b[:5])
    with pytest.raises(ValueError, match="at least 3 folds"):
        residual_mutual_information(a, b, folds=2)


class StandInNetwork(nn.Module):
    """Returns the network contract dict for parts y (2 features, 2 classes) and z (1 feature)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 3)
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls.append((self.training, torch.is_grad_enabled()))
        features = self.encoder(image.flatten(1))
        return {
            "features": features,
            "y_features": features[:, :2],
            "z_features": features[:, 2:],
            "y_output": features[:, :2],
            "z_output": torch.cat([features[:, 2:], -features[:, 2:]], dim=1),
        }


def test_collect_outputs_concatenates_outputs_and_labels_in_eval_mode():
    torch.manual_seed(0)
    network = StandInNetwork()
    images = torch.randn(10, 1, 2, 2)
    y, z = torch.arange(10) % 2, torch.arange(10) // 5
    loader = [{"image": images[i : i + 4], "y": y[i : i + 4], "z": z[i : i + 4]} for i in (0, 4, 8)]

    outputs = collect_outputs(network, loader, ["y", "z"], "cpu")

    assert set(outputs) == {"features", "y_features", "z_features", "y_output", "z_output", "y_label", "z_label"}
    assert outputs["features"].shape == (10, 3)
    assert outputs["z_output"].shape == (10, 2)
    np.testing.assert_allclose(outputs["features"], network.encoder(images.flatten(1)).detach().numpy(), rtol=1e-6)
    np.testing.assert_array_equal(outputs["y_label"], y.numpy())
    np.testing.assert_array_equal(outputs["z_label"], z.numpy())
    assert network.calls == [(False, False)] * 3
    assert network.training


def test_collect_outputs_names_a_missing_label():
    loader = [{"image": torch.randn(2, 1, 2, 2), "y": torch.tensor([0, 1])}]
    with pytest.raises(KeyError, match="'z'"):
        collect_outputs(StandInNetwork(), loader, ["y", "z"], "cpu")


def test_plots_write_png_files(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 5))
    labels = {"sex": rng.integers(0, 2, 60), "age": rng.uniform(20, 80, 60)}
    report = classification_report(Y, binary_probabilities(), {"w": W, "z": Z})
    history = {"mi/y-z": [0.9, 0.5, 0.2, 0.1], "weight/z": [0.5, 0.6, 0.7, 0.7], "loss": [1.0, 0.8, 0.7]}

    paths = [
        plot_tsne(features, labels, tmp_path / "tsne.png"),
        plot_training_curves(history, tmp_path / "curves" / "from_mapping.png"),
        plot_training_curves(pd.DataFrame(history["mi/y-z"], columns=["mi/y-z"]), tmp_path / "from_frame.png"),
        plot_group_accuracy({"iid": report, "inverted": report}, tmp_path / "groups.png"),
    ]

    assert all(png_written(path) for path in paths)


def synthetic_outputs(agreement: float, seed: int, n: int = 200) -> dict[str, np.ndarray]:
    """Outputs of a model that reads y from a shortcut: its f_y carries z, its head follows z."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    z = np.where(rng.random(n) < agreement, y, 1 - y)
    y_features = np.stack([z + 0.3 * rng.normal(size=n), rng.normal(size=n)], axis=1)
    return {
        "y_features": y_features,
        "z_features": z[:, None] + 0.3 * rng.normal(size=(n, 1)),
        "y_output": np.stack([-y_features[:, 0], y_features[:, 0] - 0.5], axis=1),
        "z_output": np.stack([1 - z, z], axis=1).astype(float),
        "y_label": y,
        "z_label": z,
    }


def test_evaluate_test_sets_flattens_to_mlflow_names_and_a_table():
    outputs_by_set = {
        "iid": synthetic_outputs(0.9, seed=0),
        "balanced": synthetic_outputs(0.5, seed=1),
        "inverted": synthetic_outputs(0.1, seed=2),
    }

    results = evaluate_test_sets(outputs_by_set, primary="y", spurious=["z"])
    metrics = flatten_metrics(results)

    inverted_outputs = outputs_by_set["inverted"]
    inverted = classification_report(
        inverted_outputs["y_label"], inverted_outputs["y_output"], {"z": inverted_outputs["z_label"]}
    )
    assert metrics["inverted/y_bacc"] == pytest.approx(inverted["balanced_accuracy"])
    assert metrics["inverted/z/acc_y1_z0"] == pytest.approx(inverted["factors"]["z"]["group_accuracy"]["y1_z0"])
    assert metrics["inverted/worst_group_acc"] < 0.3 < metrics["iid/y_acc"]
    # The shortcut head agrees with z wherever the features follow z; the z head is exact, so the reverse
    # reads y/z agreement: 10 % on the inverted set.
    assert metrics["balanced/z/switched_heads"] > 0.8
    assert metrics["inverted/z/switched_heads_reverse"] == pytest.approx(
        np.mean(inverted_outputs["y_label"] == inverted_outputs["z_label"])
    )
    assert metrics["leakage/z"] > 0.9
    assert "residual_mi/z" not in metrics
    table = results_table(results)
    assert table.splitlines()[0].startswith("| test set | accuracy |")
    assert all(f"| {name} |" in table for name in outputs_by_set)
    assert "| z | " in table


def test_evaluate_test_sets_estimates_residual_mi_on_request():
    results = evaluate_test_sets(
        {"iid": synthetic_outputs(0.9, seed=0, n=300)}, "y", ["z"], residual_mi={"estimator": "club", "steps": 300}
    )

    # f_y[:, 0] and f_z both follow z with noise 0.3: clearly dependent.
    assert results["residual_mi"]["z"] > 0.3
    assert results["residual_mi_given_y"]["z"] > 0.1
    assert results["residual_mi_label"]["z"] > 0.3
    assert {"residual_mi/z", "residual_mi_given_y/z", "residual_mi_label/z"} <= set(flatten_metrics(results))
    assert "residual MI with f_z given y" in results_table(results)
    assert "residual MI with z" in results_table(results)


def test_a_set_too_small_for_the_residual_mi_critics_leaves_the_other_metrics(capsys):
    # The walk-through's balanced set: 18 images, whose residual MI came out at 58.7 and -746 nats.
    tiny = synthetic_outputs(0.5, seed=1, n=18)

    with pytest.warns(UserWarning) as caught:
        results = evaluate_test_sets({"balanced": tiny}, "y", ["z"], "balanced", residual_mi={}, progress=True)

    messages = [str(warning.message) for warning in caught]
    assert [message.split(" of z on the balanced set not estimated: ")[0] for message in messages] == [
        "residual_mi", "residual_mi_given_y", "residual_mi_label"
    ]
    assert all("at least 24 rows per fold" in message and "--estimate_residual_mi False" in message for message in messages)
    assert "18 rows in 5 folds" in messages[0] and "18 rows in 5 folds" in messages[2]
    assert all(np.isnan(results[key]["z"]) for key in ("residual_mi", "residual_mi_given_y", "residual_mi_label"))
    assert 0.0 <= results["leakage"]["z"] <= 1.0
    assert 0.0 <= flatten_metrics(results)["balanced/y_acc"] <= 1.0
    bar = capsys.readouterr().err  # over the critics, naming the one that trains
    assert "residual MI:" in bar and "0/3" in bar and "residual_mi_label of z" in bar


def test_a_factor_that_does_not_vary_in_the_probed_set_leaves_the_other_metrics():
    outputs = synthetic_outputs(0.5, seed=1, n=40)
    one_sided = {**outputs, "z_label": np.zeros_like(outputs["z_label"])}

    with pytest.warns(UserWarning, match="leakage of z on the balanced set not estimated: z holds a single class"):
        results = evaluate_test_sets({"balanced": one_sided}, "y", ["z"], "balanced")

    assert np.isnan(results["leakage"]["z"])
    assert 0.0 <= flatten_metrics(results)["balanced/y_acc"] <= 1.0


def test_residual_mi_with_the_label_reads_the_leak_and_not_what_f_z_shares_with_y():
    # Balanced set: f_z follows y (its head learnt y as a shortcut for z), f_y carries y and no z.
    rng = np.random.default_rng(0)
    n = 400
    y, z = rng.integers(0, 2, n), rng.integers(0, 2, n)
    outputs = {
        "y_features": y[:, None] + 0.3 * rng.normal(size=(n, 2)),
        "z_features": y[:, None] + 0.3 * rng.normal(size=(n, 1)),
        "y_output": np.stack([1 - y, y], axis=1).astype(float),
        "y_label": y,
        "z_label": z,
    }

    results = evaluate_test_sets({"balanced": outputs}, "y", ["z"], "balanced", residual_mi={"estimator": "mine", "steps": 300, "folds": 3})

    assert results["residual_mi"]["z"] > 0.3
    assert abs(results["residual_mi_label"]["z"]) < 0.05


def test_readout_fit_does_not_depend_on_the_scale_of_the_weights():
    features, y, z = shortcut_features(500, 0.9, seed=0)
    weights = cell_balancing_weights({"y": y, "z": z})  # sums to one

    summed_to_one = fit_linear_readout(features, y, weights)[-1].coef_
    mean_one = fit_linear_readout(features, y, len(y) * weights)[-1].coef_
    unweighted = fit_linear_readout(features, y)[-1].coef_

    np.testing.assert_allclose(summed_to_one, mean_one, rtol=1e-6)
    # Taken as they are, weights summing to one would shrink the coefficients towards zero.
    assert np.abs(mean_one).sum() > 0.5 * np.abs(unweighted).sum()


def test_nan_scores_are_refused_not_scored_as_class_zero():
    from mimm_med.evaluation.metrics import as_probabilities

    logits = np.array([[0.1, 0.9], [np.nan, 0.0], [0.3, 0.2], [np.inf, 1.0]])
    with pytest.raises(ValueError, match=r"2 of 4 rows of classification scores are NaN or infinite \(first rows \[1, 3\]\)"):
        as_probabilities(logits)
    assert as_probabilities(logits[[0, 2]]).shape == (2, 2)
