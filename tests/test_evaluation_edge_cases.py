"""Edge cases of mimm_med.evaluation met on real cohorts: empty groups, imbalanced or missing labels,
diverged features, collapsed features, regression heads, interrupted writes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from mimm_med.evaluation import (
    classification_report,
    conditional_mean_eraser,
    evaluate_test_sets,
    linear_probe_leakage,
    plot_tsne,
    residual_mutual_information,
    results_table,
)
from mimm_med.evaluation import plots
from mimm_med.evaluation.leakage import TooFewRowsError


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def one_hot_scores(predicted: np.ndarray, n_classes: int = 2) -> np.ndarray:
    return 5.0 * np.eye(n_classes)[predicted]


def primary_only_outputs(agreement: float, seed: int, n: int = 400) -> dict[str, np.ndarray]:
    """A network whose f_y holds y and nothing of z; z agrees with y at the given rate."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    z = np.where(rng.random(n) < agreement, y, 1 - y)
    y_features = np.stack([3.0 * y + rng.normal(size=n), rng.normal(size=n)], axis=1)
    return {
        "y_features": y_features,
        "y_output": np.stack([-y_features[:, 0], y_features[:, 0] - 1.5], axis=1),
        "y_label": y,
        "z_label": z,
    }


def test_an_empty_group_is_noted_rather_than_silently_left_out_of_the_worst_group():
    # No subject has y = 0 and z = 1 (an iid set at r = 1, or a rare scanner).
    y = np.array([0, 0, 0, 1, 1, 1])
    z = np.array([0, 0, 0, 0, 0, 1])

    report = classification_report(y, one_hot_scores(y), {"z": z})

    assert "y0_z1" not in report["factors"]["z"]["group_accuracy"]
    assert report["worst_group_accuracy"] == pytest.approx(1.0)
    notes = [note for note in report["notes"] if "no samples" in note]
    assert len(notes) == 1 and "y0_z1" in notes[0] and "'z'" in notes[0]


def test_linear_probe_finds_a_leak_in_an_imbalanced_factor():
    # A 90/10 factor shifted by 2 sd in one column: the best linear read-out reaches a balanced accuracy of
    # Phi(1) = 0.84. A probe fitted without class weights mostly predicts the majority and reads 0.67.
    rng = np.random.default_rng(0)
    z = (rng.random(1000) < 0.1).astype(int)
    features = rng.normal(size=(1000, 8))
    features[:, 2] += 2.0 * z

    assert linear_probe_leakage(features, z) > 0.77


def test_leakage_is_read_on_the_balanced_set_by_default():
    # f_y holds y only. On the iid set z agrees with y 90 % of the time, so a probe there reads z through y.
    outputs_by_set = {
        "iid": primary_only_outputs(0.9, seed=0),
        "balanced": primary_only_outputs(0.5, seed=1),
        "inverted": primary_only_outputs(0.1, seed=2),
    }

    default = evaluate_test_sets(outputs_by_set, "y", ["z"])["leakage"]["z"]
    on_iid = evaluate_test_sets(outputs_by_set, "y", ["z"], leakage_set="iid")["leakage"]["z"]

    assert abs(default - 0.5) < 0.1
    assert on_iid > 0.8  # the confounded reading, still there when asked for explicitly


def test_diverged_features_are_refused_with_the_rows_named():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 3))
    features[[4, 7], 1] = [np.nan, np.inf]
    z = np.arange(40) % 2

    message = r"2 of 40 rows of features are NaN or infinite \(first rows \[4, 7\]\)"
    with pytest.raises(ValueError, match=message):
        linear_probe_leakage(features, z)
    with pytest.raises(ValueError, match=message):
        conditional_mean_eraser(features, z, {"w": (np.arange(40) // 2) % 2})
    with pytest.raises(ValueError, match=r"rows of a are NaN or infinite"):
        residual_mutual_information(features, rng.normal(size=(40, 2)), estimator="gaussian")
    with pytest.raises(ValueError, match=message):
        plot_tsne(features, {"z": z}, "unused.png")


def test_evaluate_test_sets_names_the_set_of_diverged_features():
    outputs = primary_only_outputs(0.5, seed=1)
    outputs["y_features"][3, 0] = np.nan

    with pytest.raises(ValueError, match=r"y_features of the balanced set are NaN or infinite"):
        evaluate_test_sets({"iid": primary_only_outputs(0.9, seed=0), "balanced": outputs}, "y", ["z"])


def test_missing_labels_are_named_as_missing_not_as_continuous():
    z = np.array([0.0, 1.0, np.nan, 1.0])

    with pytest.raises(ValueError, match=r"missing \(NaN\) for 1 of 4 samples \(first rows \[2\]\)"):
        classification_report(np.array([0, 1, 0, 1]), one_hot_scores(np.array([0, 1, 0, 1])), {"sex": z})


def test_evaluate_test_sets_names_the_set_whose_labels_are_wrong():
    inverted = primary_only_outputs(0.1, seed=2)
    inverted["y_label"] = inverted["y_label"] + 1  # classes 1, 2 for a two-class head

    with pytest.raises(ValueError, match=r"test set 'inverted': y_true holds classes \[1, 2\]"):
        evaluate_test_sets({"balanced": primary_only_outputs(0.5, seed=1), "inverted": inverted}, "y", ["z"])


def test_a_regression_primary_head_gets_an_error_that_says_so():
    outputs = primary_only_outputs(0.5, seed=1)
    outputs["y_output"] = outputs["y_features"][:, :1]

    with pytest.raises(ValueError, match=r"test set 'balanced': y_output has shape \(400, 1\).*regression head"):
        evaluate_test_sets({"balanced": outputs}, "y", ["z"])


def test_a_regression_head_of_a_spurious_factor_is_left_out_of_switched_heads():
    # age regressed (head output (N,) once squeezed), its label binned for the groups.
    outputs = primary_only_outputs(0.5, seed=1)
    outputs["age_output"] = np.random.default_rng(0).normal(size=400)
    outputs["age_label"] = np.random.default_rng(7).integers(0, 3, 400)

    results = evaluate_test_sets({"balanced": outputs}, "y", ["age"])

    assert results["sets"]["balanced"]["switched_heads"] == {}
    assert set(results["sets"]["balanced"]["factors"]["age"]["group_accuracy"]) == {
        f"y{y}_z{z}" for y in (0, 1) for z in (0, 1, 2)
    }


def test_residual_mi_given_names_the_class_too_small_for_the_critics():
    rng = np.random.default_rng(0)
    given = np.array([0] * 150 + [1] * 30)

    with pytest.raises(TooFewRowsError, match=r"given class 1 holds 30 of 180 rows: 30 rows in 5 folds"):
        residual_mutual_information(rng.normal(size=(180, 2)), rng.normal(size=(180, 2)), "gaussian", given=given)


def test_residual_mi_given_with_missing_labels_says_so_rather_than_too_few_rows():
    # before: "0 rows in 5 folds", a TooFewRowsError that the protocol turns into a silent NaN
    rng = np.random.default_rng(0)
    given = rng.integers(0, 2, 600).astype(float)
    given[:200] = np.nan
    with pytest.raises(ValueError, match=r"given is missing \(NaN\) for 200 of 600 samples") as error:
        residual_mutual_information(rng.normal(size=(600, 2)), rng.normal(size=(600, 2)), "gaussian", given=given)
    assert not isinstance(error.value, TooFewRowsError)


def test_integer_labels_in_an_object_array_score_as_integers():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    as_objects = classification_report(np.array([0, 0, 1, 1], dtype=object), scores)
    as_integers = classification_report(np.array([0, 0, 1, 1]), scores)
    assert as_objects.keys() == as_integers.keys()
    np.testing.assert_equal(as_objects, as_integers)  # NaN (no groups given) equal to NaN
    with pytest.raises(ValueError, match=r"non-integer values \(dtype object, e.g. \['a', 'b', 'a'\]\)"):
        classification_report(np.array(["a", "b", "a", "b"], dtype=object), scores)


def test_tsne_of_collapsed_features_is_drawn_instead_of_crashing_the_process(tmp_path):
    # Features of a network that collapsed to one point. sklearn's PCA initialisation divides by their zero
    # spread and the process died with a segmentation fault, so this runs in a child process.
    script = textwrap.dedent(
        f"""
        import numpy as np
        from mimm_med.evaluation import plot_tsne
        plot_tsne(np.ones((40, 4)), {{"sex": np.arange(40) % 2}}, {str(tmp_path / "tsne.png")!r})
        """
    )
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)

    assert finished.returncode == 0, finished.stderr[-2000:]
    assert (tmp_path / "tsne.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def drawn_points(axes) -> int:
    return sum(len(collection.get_offsets()) for collection in axes.collections)


def test_tsne_panels_draw_rows_without_a_label_and_text_labels():
    points = np.random.default_rng(0).normal(size=(20, 2))
    sex = (np.arange(20) % 2).astype(float)
    sex[:5] = np.nan
    figure = Figure()
    with_missing, with_text = figure.subplots(1, 2)

    plots._scatter_coloured(figure, with_missing, points, sex)
    plots._scatter_coloured(figure, with_text, points, np.array(["ukb", "nako"] * 10))

    # A colour map would have drawn the NaN rows invisibly and treated the factor as continuous.
    assert drawn_points(with_missing) == 20
    assert [text.get_text() for text in with_missing.get_legend().get_texts()] == ["0", "1", "missing (5)"]
    assert drawn_points(with_text) == 20
    assert [text.get_text() for text in with_text.get_legend().get_texts()] == ["nako", "ukb"]


def test_an_interrupted_figure_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "groups.png"
    path.write_bytes(b"previous figure")

    def killed_midway(self, target, **kwargs):
        with open(target, "wb") as file:
            file.write(b"\x89PNG trunc")
        raise OSError("No space left on device")

    monkeypatch.setattr(Figure, "savefig", killed_midway)
    with pytest.raises(OSError, match="No space"):
        plots._save(Figure(), path)

    assert path.read_bytes() == b"previous figure"
    assert [child.name for child in tmp_path.iterdir()] == ["groups.png"]


def test_results_json_writes_an_undefined_metric_as_null_not_as_invalid_nan(tmp_path):
    from mimm_med.evaluation.report import write_report

    sets = {name: primary_only_outputs(agreement, seed) for seed, (name, agreement) in enumerate(
        [("iid", 0.9), ("balanced", 0.5), ("inverted", 0.1)])}  # fmt: skip
    sets["inverted"]["y_label"] = np.zeros(400, dtype=int)  # one class: its AUROC is undefined
    results = evaluate_test_sets(sets, "y", ["z"])
    paths = write_report(results, sets, "y", ["z"], tmp_path)

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    metrics = json.loads(paths["json"].read_text(), parse_constant=refuse)["metrics"]
    assert metrics["inverted/y_auroc"] is None and 0.0 <= metrics["balanced/y_auroc"] <= 1.0


def test_write_json_turns_numpy_scalars_and_non_finite_numbers_into_strict_json(tmp_path):
    from mimm_med.data.writers import write_json

    document = {"nan": float("nan"), "inf": np.float32(np.inf), "f": np.float32(0.5), "i": np.int64(3),
                "flag": np.bool_(True), "pair": (1.0, float("-inf")), "array": np.array([2.0, np.nan])}  # fmt: skip
    path = write_json(tmp_path / "out.json", document)

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    assert json.loads(path.read_text(), parse_constant=refuse) == {
        "nan": None, "inf": None, "f": 0.5, "i": 3, "flag": True, "pair": [1.0, None], "array": [2.0, None]}  # fmt: skip
    assert path.read_text().endswith("}\n") and [child.name for child in tmp_path.iterdir()] == ["out.json"]


def test_a_checkpoint_of_another_network_is_named_with_the_fix(tmp_path):
    from mimm_med.evaluation.report import evaluate_checkpoint
    from mimm_med.networks import MIMMXNet

    def network(part: int) -> MIMMXNet:
        return MIMMXNet("small_cnn", {"y": part, "z": part}, {"y": 2, "z": 2}, backbone_kwargs={"channels": (4, 8)})

    checkpoint = tmp_path / "model.pt"
    torch.save({"network": network(8).state_dict()}, checkpoint)
    with pytest.raises(ValueError, match=r"model.pt holds another network than these settings build \(.*size mismatch"):
        evaluate_checkpoint(network(4), checkpoint, tmp_path, lambda path: [], None, "y", ["z"], "cpu", tmp_path)


def test_an_evaluation_says_where_its_report_is(tmp_path, capsys):
    from mimm_med.evaluation.report import evaluate_checkpoint
    from mimm_med.networks import MIMMXNet

    network = MIMMXNet("small_cnn", {"y": 4, "z": 4}, {"y": 2, "z": 2}, backbone_kwargs={"channels": (4, 8)})
    checkpoint = tmp_path / "model.pt"
    torch.save({"network": network.state_dict()}, checkpoint)
    rng = np.random.default_rng(0)
    rows = [{"image": torch.tensor(rng.random((1, 16, 16)), dtype=torch.float32), "y": i % 2, "z": i // 2 % 2}
            for i in range(16)]
    out = tmp_path / "eval"
    evaluate_checkpoint(network, checkpoint, tmp_path, lambda path: rows, None, "y", ["z"], "cpu", out)
    assert f"evaluate: report {out / 'results.md'}" in capsys.readouterr().out


def test_the_report_is_written_as_utf8_whatever_the_locale(tmp_path):
    import locale

    from mimm_med.evaluation.report import write_report

    sets = {name: primary_only_outputs(agreement, seed) for seed, (name, agreement) in enumerate(
        [("iid", 0.9), ("balanced", 0.5), ("inverted", 0.1)])}  # fmt: skip
    results = evaluate_test_sets(sets, "y", ["z"])
    # A process whose C library switched to the C locale (some native readers do) opened text files as ASCII,
    # and the table's dashes ended an evaluation after its network had run.
    previous = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        paths = write_report(results, sets, "y", ["z"], tmp_path)
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)
    assert paths["markdown"].read_text(encoding="utf-8") == results_table(results) + "\n"
