"""The MONAI bundles end to end on tiny data: train → evaluate → infer (checkpoint and registry) → TorchScript.

Bundles run in this process through ``monai.bundle.run`` from the repository root, as ``python -m
monai.bundle run ...`` runs them; only the data, the image size and the batch size are overridden.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from bundle_runs import error_chain
from filelock import FileLock
from mlflow import MlflowClient
from monai.bundle import ConfigParser, ckpt_export, run
from PIL import Image

from mimm_med.cli import main
from mimm_med.data.confounding import SPLIT_NAMES
from mimm_med.data.datalist import PREPARE_HINT
from mimm_med.data.manifest import read_manifest, write_manifest
from mimm_med.data.writers import prediction_folder
from mimm_med.engines import SettingsMismatch
from mimm_med.tracking import network_summary
from mimm_med.tracking.config_artifacts import NETWORK_FILE

REPO = Path(__file__).resolve().parents[1]
MANDATORY_METADATA = (
    "version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version", "task",
    "description", "authors", "copyright", "network_data_format", "changelog", "schema",
)  # fmt: skip
#: Rows kept per split of the digits set: a few batches of training, enough test images for every metric.
DIGITS_ROWS = {"train": 64, "val": 16, "test-iid": 32, "test-balanced": 32, "test-inverted": 32}


@dataclass(frozen=True)
class Bundle:
    """A bundle under test: its name, the fixture that makes its splits, and its small-run overrides."""

    name: str
    splits: str
    overrides: dict = field(default_factory=dict)

    @property
    def configs(self) -> str:
        return f"bundles/{self.name}/configs"

    def config_files(self, *workflows: str) -> list[str]:
        return [f"{self.configs}/{workflow}.json" for workflow in ("train", *workflows)]

    def parser(self, *workflows: str) -> ConfigParser:
        """A parser of :meth:`config_files`, read from the repository root wherever the test runs."""
        parser = ConfigParser()
        parser.read_config([str(REPO / file) for file in self.config_files(*workflows)])
        return parser


BUNDLES = [
    Bundle("mimm_digits", "digits_small_splits", {"batch_size": 16}),
    Bundle("mimmx_cxr", "cxr_splits", {"spatial_size": [32, 32], "batch_size": 16}),
    Bundle("mimmx_brain", "brain_splits", {"spatial_size": [24, 24, 24], "batch_size": 4}),
]


def _shared_folder(tmp_path_factory: pytest.TempPathFactory, worker_id: str, name: str) -> Path:
    """A folder of this test run that pytest-xdist workers share (build it under ``FileLock(f"{folder}.lock")``)."""
    root = tmp_path_factory.getbasetemp()
    return (root if worker_id == "master" else root.parent) / name


@pytest.fixture(scope="session")
def digits_splits(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The whole Digits-Morpho split folder at r = 0.9, written by ``mimm-med cohort digits`` (about 10 s)."""
    out = _shared_folder(tmp_path_factory, worker_id, "digits_splits")
    with FileLock(f"{out}.lock"):
        if not (out / "cells.csv").exists():
            assert main(["cohort", "digits", "--out", str(out), "--correlation", "0.9"]) == 0
    return out


@pytest.fixture(scope="module")
def digits_small_splits(digits_splits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first :data:`DIGITS_ROWS` rows of every digits split, pointing at the same images."""
    out = tmp_path_factory.mktemp("digits_small")
    for name, rows in DIGITS_ROWS.items():
        write_manifest(read_manifest(digits_splits / f"{name}.csv").head(rows), out / f"{name}.csv")
    return out


@pytest.fixture(scope="module")
def cxr_splits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in CheXpert cohort of 300 patients, preprocessed to 32² and split at r = 0.7 (about 10 s)."""
    work = tmp_path_factory.mktemp("cxr")
    raw, processed, splits = work / "raw", work / "processed", work / "splits"
    commands = [
        ["cohort", "generate", "chexpert", "--n", "300", "--resolution-mm", "4", "--out", str(raw), "--no-progress"],
        ["preprocess", "--cohort", f"{REPO}/cohorts/chexpert.yaml", "--raw", str(raw), "--out", str(processed),
         "--key", "test-key-for-the-bundle-tests", "--set", "spatial_size=32"],
        ["cohort", "split", "--manifest", str(processed / "manifest.csv"), "--primary", "effusion",
         "--spurious", "sex=0.7,devices=0.7", "--out", str(splits)],
    ]  # fmt: skip
    for command in commands:
        assert main(command) in (0, 1)  # 1: some metadata rows dropped by the card (uncertain effusion)
    return splits



def _predictions(path: Path) -> pd.DataFrame:
    """``predictions.csv`` of an inference, indexed by image: subject_id, ``p_<level>`` per level, prediction."""
    return pd.read_csv(path, index_col="image", dtype={"subject_id": str})



def _network(bundle: Bundle, checkpoint: Path | None = None) -> torch.nn.Module:
    network = bundle.parser().get_parsed_content("network_def")
    if checkpoint is not None:
        network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["network"])
    return network.eval()


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_bundle_trains_evaluates_infers_and_exports(bundle: Bundle, request, at_repo_root: str, tmp_path: Path, capsys):
    splits = request.getfixturevalue(bundle.splits)
    root = tmp_path / bundle.name
    settings = {"dataset_dir": str(splits), "bundle_root": str(root), **bundle.overrides}
    run("training", config_file=bundle.config_files(), epochs=1, cache_rate=0, **settings)

    defaults = ConfigParser.load_config_file(f"{bundle.configs}/train.json")
    run_name = f"{defaults['method']}-seed0"
    client = MlflowClient(at_repo_root)
    experiment = client.get_experiment_by_name(bundle.name)
    (training,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'")
    assert training.info.status == "FINISHED"
    assert "train/loss" in training.data.metrics and "val_bacc" in training.data.metrics
    candidate = client.get_model_version_by_alias(bundle.name, "candidate")
    assert candidate.run_id == training.info.run_id
    configs = {a.path for a in client.list_artifacts(training.info.run_id, f"configs/bundles/{bundle.name}/configs")}
    shared = {a.path for a in client.list_artifacts(training.info.run_id, "configs/bundles/common/configs")}
    # both train.json files, which MONAI's MLFlowHandler logged at one path, so that one replaced the other
    assert f"configs/bundles/{bundle.name}/configs/train.json" in configs
    assert "configs/bundles/common/configs/train.json" in shared
    # the network as built (command-line overrides of it are in no config file) in full, which the param names
    built = _network(bundle)
    logged = Path(client.download_artifacts(training.info.run_id, f"configs/{NETWORK_FILE}", str(tmp_path)))
    assert logged.read_text() == repr(built)
    assert training.data.params["network_def"] == network_summary(built)

    # Few critic steps: the test checks that the estimates reach MLflow, not their values.
    run("evaluating", config_file=bundle.config_files("evaluate"), residual_mi={"folds": 3, "patience": 3}, **settings)
    output_dir = root / "eval" / run_name
    metrics = json.loads((output_dir / "results.json").read_text())["metrics"]
    assert 0.0 <= metrics["inverted/y_bacc"] <= 1.0
    (evaluation,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}-evaluate'")
    assert evaluation.info.status == "FINISHED" and "inverted/y_bacc" in evaluation.data.metrics
    # the training run's settings, to filter and compare evaluations by
    assert {key: evaluation.data.params[key] for key in ("method", "seed", "mi_weight")} == {
        key: training.data.params[key] for key in ("method", "seed", "mi_weight")
    }
    factors = [name.removeprefix("leakage/") for name in evaluation.data.metrics if name.startswith("leakage/")]
    assert factors
    for key in ("residual_mi", "residual_mi_given_y", "residual_mi_label"):
        assert {f"{key}/{factor}" for factor in factors} <= set(evaluation.data.metrics)

    primary = defaults["primary"]
    levels, probabilities = defaults["label_levels"][primary], [f"p_{level}" for level in defaults["label_levels"][primary]]
    manifest = read_manifest(splits / "test-iid.csv")
    capsys.readouterr()
    run("inferring", config_file=bundle.config_files("inference"), **settings)
    # by default in a folder of the model's and the input's own
    table = root / "predictions" / prediction_folder(run_name, splits / "test-iid.csv") / "predictions.csv"
    from_checkpoint = _predictions(table)
    assert list(from_checkpoint.columns) == ["subject_id", *probabilities, "prediction", "model"]
    assert set(from_checkpoint["model"]) == {str(root.absolute() / "models" / run_name / "model.pt")}
    assert from_checkpoint.index.tolist() == manifest["image"].tolist()
    assert from_checkpoint["subject_id"].tolist() == manifest["subject_id"].tolist()
    np.testing.assert_allclose(from_checkpoint[probabilities].sum(axis=1), 1.0, rtol=1e-5)
    assert from_checkpoint["prediction"].tolist() == [levels[code] for code in from_checkpoint[probabilities].to_numpy().argmax(axis=1)]
    assert f"infer: predictions of {len(manifest)} images in {table}\n" in capsys.readouterr().out
    registered = f"models:/{bundle.name}@candidate"
    run("inferring", config_file=bundle.config_files("inference"), model_uri=registered, **settings)
    from_registry = _predictions(root / "predictions" / prediction_folder(registered, splits / "test-iid.csv") / "predictions.csv")
    # the version the alias pointed at, which a promotion cannot change afterwards
    assert set(from_registry.pop("model")) == {f"models:/{bundle.name}/{candidate.version}"}
    pd.testing.assert_frame_equal(from_registry, from_checkpoint.drop(columns="model"), atol=1e-5, rtol=1e-4)

    # settings that change what the network's numbers mean are refused, with the override that the training had
    swapped = {**defaults["label_levels"], primary: levels[::-1]}
    with pytest.raises(Exception) as raised:
        run("evaluating", config_file=bundle.config_files("evaluate"), **{**settings, "label_levels": swapped})
    (refusal,) = [error for error in error_chain(raised.value) if isinstance(error, SettingsMismatch)]
    assert f"label_levels: {defaults['label_levels']!r} in training, {swapped!r} now" in str(refusal)
    assert f'add --label_levels "{defaults["label_levels"]!r}"' in str(refusal)
    trained_size = settings.get("spatial_size", defaults["spatial_size"])
    with pytest.raises(Exception) as raised:
        run("inferring", config_file=bundle.config_files("inference"), model_uri=registered,
            **{**settings, "spatial_size": [size + 8 for size in trained_size]})  # fmt: skip
    (refusal,) = [error for error in error_chain(raised.value) if isinstance(error, SettingsMismatch)]
    assert f"MLflow run {training.info.run_id}" in str(refusal) and f'add --spatial_size "{trained_size!r}"' in str(refusal)

    # an image that cannot be read, or holds what the network cannot take, costs its own prediction, not the others'
    image = Path(manifest.loc[0, "image"])
    broken = tmp_path / f"broken_{image.name}"
    broken.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    unusable, reason = _unusable_copy(Path(manifest.loc[1, "image"]), tmp_path)
    manifest.loc[0, "image"], manifest.loc[1, "image"] = str(broken), str(unusable)
    write_manifest(manifest, tmp_path / "with_broken.csv")
    capsys.readouterr()
    run("inferring", config_file=bundle.config_files("inference"), input_manifest=str(tmp_path / "with_broken.csv"), **settings)
    table = root / "predictions" / prediction_folder(run_name, tmp_path / "with_broken.csv") / "predictions.csv"
    predicted = _predictions(table)
    assert len(predicted) == len(manifest) - 2 and not {str(broken), str(unusable)} & set(predicted.index)
    pd.testing.assert_frame_equal(predicted, from_checkpoint.iloc[2:], atol=1e-5, rtol=1e-4)
    log = capsys.readouterr().out  # the bundle's logging.conf logs to standard output
    assert f"skipped {broken}" in log
    assert f"skipped {unusable}: ValueError: {reason}" in log, log[-3000:]
    assert (
        f"infer: predictions of {len(manifest) - 2} images in {table}; 2 of {len(manifest)} images could not be read "
        "and were skipped" in log
    )
    # evaluation leaves such an image out too, naming it, and counts it in the report and MLflow
    with_unusable = read_manifest(splits / "test-iid.csv")
    with_unusable.loc[1, "image"] = str(unusable)
    capsys.readouterr()
    run("evaluating", config_file=bundle.config_files("evaluate"), estimate_residual_mi=False,
        **{**settings, "dataset_dir": str(_splits_with(splits, "test-balanced", with_unusable, tmp_path / "bad"))})  # fmt: skip
    out = capsys.readouterr().out
    assert f"skipped {unusable}: ValueError: {reason}" in out, out[-3000:]
    assert "Left out as unreadable (the warnings name them): 1 of the balanced set" in out
    reported = json.loads((output_dir / "results.json").read_text())
    assert reported["skipped_images"] == {"iid": 0, "balanced": 1, "inverted": 0}
    assert reported["metrics"]["balanced/skipped_images"] == 1
    assert sum(reported["sets"]["balanced"]["factors"][reported["spurious"][0]]["group_size"].values()) == len(with_unusable) - 1

    checkpoint = root / "models" / run_name / "model.pt"
    exported = tmp_path / "model.ts"
    ckpt_export(
        "network_def", filepath=str(exported), ckpt_file=str(checkpoint), key_in_ckpt="network", config_file=f"{bundle.configs}/train.json",
        meta_file=f"{bundle.configs}/metadata.json",
    )  # fmt: skip
    extra_files = {"metadata.json": ""}
    scripted = torch.jit.load(str(exported), _extra_files=extra_files)
    assert json.loads(extra_files["metadata.json"])["version"]
    image = torch.rand(2, 1, *settings.get("spatial_size", defaults["spatial_size"]))
    with torch.no_grad():
        expected, actual = _network(bundle, checkpoint)(image), scripted(image)
    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key])


def _unusable_copy(image: Path, folder: Path) -> tuple[Path, str]:
    """A readable copy of ``image`` that the network cannot take, and the reason the bundle gives for it."""
    if image.name.endswith(".nii.gz"):  # a volume of NaN
        volume = nib.load(image)
        target = folder / f"nan_{image.name}"
        nib.save(nib.Nifti1Image(np.full(volume.shape, np.nan, np.float32), volume.affine), target)
        return target, f"{int(np.prod(volume.shape))} of {int(np.prod(volume.shape))} values are NaN or infinite"
    target = folder / f"rgb_{image.name}"  # a colour export of a grey image
    rgb = Image.open(image).convert("RGB")
    rgb.save(target)
    return target, f"expected a 1-channel 2D image, got channel-first shape (3, {rgb.size[0]}, {rgb.size[1]})"


def _splits_with(splits: Path, name: str, manifest: pd.DataFrame, folder: Path) -> Path:
    """A copy of the split folder ``splits`` whose split ``name`` is ``manifest``."""
    for split in SPLIT_NAMES:
        write_manifest(manifest if split == name else read_manifest(splits / f"{split}.csv"), folder / f"{split}.csv")
    return folder


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_metadata_describes_the_network(bundle: Bundle):
    metadata = json.loads((REPO / bundle.configs / "metadata.json").read_text())
    assert not [key for key in MANDATORY_METADATA if key not in metadata]
    assert metadata["version"] in metadata["changelog"]
    assert "optional_packages_version" not in metadata  # MONAI's deprecated name: a warning on every run
    image = metadata["network_data_format"]["inputs"]["image"]
    with torch.no_grad():
        outputs = _network(bundle)(torch.zeros(1, image["num_channels"], *image["spatial_shape"]))
    described = metadata["network_data_format"]["outputs"]
    assert {key for key in outputs if key.endswith("_output")} <= set(described) <= set(outputs)
    for key, spec in described.items():
        assert list(outputs[key].shape[1:]) == spec["spatial_shape"] == [spec["num_channels"]]


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_validation_labels_reach_the_prediction_device(bundle: Bundle):
    # MONAI's decollate hands the post-transforms each label as a Python number; on CUDA a label
    # left on the CPU broke the validation metric. The "meta" device stands in for a GPU here.
    parser = bundle.parser()
    parser["device"] = torch.device("meta")
    postprocessing = parser.get_parsed_content("validate#postprocessing")
    classes = len(parser["label_levels"][parser["primary"]])
    item = postprocessing({"pred": torch.zeros(classes, device="meta"), "label": 1})
    assert item["pred"].device == item["label"].device == torch.device("meta")


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_missing_splits_name_the_command_that_makes_them(bundle: Bundle, at_repo_root: str, tmp_path: Path):
    with pytest.raises(Exception) as raised:
        run("training", config_file=bundle.config_files(), dataset_dir=str(tmp_path), bundle_root=str(tmp_path))
    messages = [str(error) for error in error_chain(raised.value)]
    assert any(PREPARE_HINT in message and str(tmp_path / "train.csv") in message for message in messages)


def test_digits_splits_on_disk(digits_splits: Path):
    cells = pd.read_csv(digits_splits / "cells.csv")
    agreement = cells.groupby(["split", "factor"])["agreement"].first()
    for split, expected in {"train": 0.9, "test-iid": 0.9, "test-balanced": 0.5, "test-inverted": 0.1}.items():
        for factor in ("thickness", "rotation"):
            assert abs(agreement[split, factor] - expected) < 0.06, (split, factor)
    splits = {name: read_manifest(digits_splits / f"{name}.csv") for name in SPLIT_NAMES}
    assert list(pd.read_csv(digits_splits / "train.csv").columns) == [
        "subject_id", "image", "digit", "thickness", "rotation", "cohort", "status",
    ]  # fmt: skip
    subjects = {name: set(frame["subject_id"]) for name, frame in splits.items()}
    assert not subjects["train"] & subjects["val"]
    assert not (subjects["train"] | subjects["val"]) & subjects["test-iid"]
    assert subjects["test-iid"] == subjects["test-balanced"] == subjects["test-inverted"]
    row = splits["test-inverted"].iloc[0]
    with Image.open(row["image"]) as image:
        assert image.mode == "L" and image.size == (28, 28)
    assert Path(row["image"]).name == f"thickness{row['thickness']}-rotation{row['rotation']}.png"


def test_digits_oracle_trains_on_balanced_data(tmp_path: Path):
    out = tmp_path / "oracle"
    assert main(["cohort", "digits", "--out", str(out), "--correlation", "0.8", "--confounders", "rotation",
                 "--oracle", "--seed", "1"]) == 0  # fmt: skip
    agreement = pd.read_csv(out / "cells.csv").groupby("split")["agreement"].first()
    assert abs(agreement["train"] - 0.5) < 0.06 and abs(agreement["test-iid"] - 0.8) < 0.06
    assert set(read_manifest(out / "train.csv")["thickness"]) == {0}  # not a confounder: thin throughout
    assert main(["cohort", "digits", "--out", str(out), "--confounders", "colour"]) == 2


def test_invariant_head_is_refitted_for_validation_and_training_keeps_its_weights(
    digits_splits: Path, at_repo_root: str, tmp_path: Path
):
    bundle = BUNDLES[0]
    settings = {"dataset_dir": str(digits_splits), "bundle_root": str(tmp_path), "batch_size": 64, "run_name": "refit"}
    run("training", config_file=bundle.config_files(), epochs=1, cache_rate=0, invariant_head=True, **settings)

    folder = tmp_path / "models" / "refit"
    best = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)["network"]
    (resumable,) = folder.glob("checkpoint_*.pt")
    trained = torch.load(resumable, map_location="cpu", weights_only=True)["network"]
    head = f"heads.{ConfigParser.load_config_file(f'{bundle.configs}/train.json')['primary']}.weight"
    # The refit's signature on a binary head: logits (0, s); a trained head's first row is not zero.
    # The best checkpoint (validated) has it, the checkpoint that training resumes from does not.
    assert torch.equal(best[head][0], torch.zeros_like(best[head][0]))
    assert not torch.equal(trained[head][0], torch.zeros_like(trained[head][0]))
    client = MlflowClient(at_repo_root)
    (training,) = client.search_runs([client.get_experiment_by_name(bundle.name).experiment_id], "attributes.run_name = 'refit'")
    assert training.data.params["invariant_head"] == "True"


@pytest.mark.parametrize("given, expected", [("false", False), ("False", False), ("true", True), (False, False), (True, True)])
def test_on_off_settings_read_as_the_command_line_spells_them(given, expected):
    # monai.bundle's command line gives --invariant_head false as the string "false", which Python takes for true
    parser = BUNDLES[0].parser()
    for name in ("invariant_head", "conditional", "balanced", "amp"):
        parser[name] = given
    assert parser.get_parsed_content("run_name").endswith("-invariant-head-seed0") is expected
    assert parser.get_parsed_content("train#trainer#amp") is parser.get_parsed_content("validate#evaluator#amp") is expected
    params = parser.get_parsed_content("mlflow#params")
    assert params["invariant_head"] is params["conditional"] is params["balanced"] is expected


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_the_mlflow_params_hold_the_settings_that_choose_the_registered_weights(bundle: Bundle, tmp_path: Path):
    # val_interval (which epochs can give the best checkpoint) and amp were logged by no run, so two
    # runs that registered different weights had the same params; nor did an evaluation log its residual-MI options.
    parser = bundle.parser("evaluate")
    parser.update({"val_interval": 2, "amp": "true", "bundle_root": str(tmp_path), "residual_mi": {"estimator": "club"}})
    params = parser.get_parsed_content("mlflow#params")
    assert params["val_interval"] == 2 and params["amp"] is True
    settings = parser.get_parsed_content("checkpointing#resume#settings")
    assert settings["val_interval"] == 2 and "amp" not in settings  # amp follows the machine a run resumes on
    evaluation = parser.get_parsed_content("evaluation_params")
    assert evaluation["residual_mi"] == {"estimator": "club"} and evaluation["val_interval"] == 2
    parser["estimate_residual_mi"] = "false"
    assert parser.get_parsed_content("evaluation_params", lazy=False)["residual_mi"] is None


def test_an_on_off_setting_that_is_neither_names_itself():
    parser = BUNDLES[0].parser()
    parser["invariant_head"] = "yes"
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content("run_name")
    messages = [str(error) for error in error_chain(raised.value)]
    assert any("invariant_head is an on/off setting: give true or false (e.g. --invariant_head false), got 'yes'" in m for m in messages)


def test_training_on_splits_that_share_a_subject_stops_before_any_work(digits_small_splits: Path, at_repo_root: str, tmp_path: Path):
    leaky = tmp_path / "splits"
    shutil.copytree(digits_small_splits, leaky)
    train = pd.read_csv(leaky / "train.csv")
    pd.concat([pd.read_csv(leaky / "val.csv"), train.head(3)]).to_csv(leaky / "val.csv", index=False)
    with pytest.raises(Exception) as raised:
        run("training", config_file=BUNDLES[0].config_files(), dataset_dir=str(leaky), bundle_root=str(tmp_path / "root"))
    messages = [str(error) for error in error_chain(raised.value)]
    assert any(f"{leaky}: splits 'train' and 'val' share 3 subjects" in message for message in messages), messages
    assert not (tmp_path / "root").exists()  # refused before a checkpoint folder or an MLflow run was made


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_a_spatial_size_that_monai_would_read_as_keep_the_images_own_is_refused_before_any_work(bundle: Bundle, at_repo_root: str, tmp_path: Path):
    parser = bundle.parser()
    zeroed = [0, *parser["spatial_size"][1:]]
    with pytest.raises(Exception) as raised:
        run("training", config_file=bundle.config_files(), spatial_size=zeroed, bundle_root=str(tmp_path / "root"))
    messages = [str(error) for error in error_chain(raised.value)]
    assert any(f"spatial_size must be whole numbers of at least 1, got {zeroed}" in message for message in messages), messages
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("handler", ["train_handler", "validation_handler"])
def test_a_tracking_server_given_on_the_command_line_keeps_the_artifacts(handler, monkeypatch):
    # --tracking_uri http://… used to create the server's experiment with this machine's ./mlruns/artifacts.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    parser = BUNDLES[0].parser()
    parser["tracking_uri"] = "http://mlflow.example.org:5000"
    assert parser.get_parsed_content(f"mlflow#{handler}#artifact_location") is None
    evaluation = ConfigParser.load_config_file(str(REPO / "bundles/common/configs/evaluate.json"))
    assert "default_artifact_location(tracking_uri=@tracking_uri)" in json.dumps(evaluation)


def test_iteration_logging_leaves_out_a_critic_loss_a_method_without_critics_lacks():
    # ERM's iterations report critic_loss NaN; MLflow logged it at every step.
    parser = BUNDLES[0].parser()
    transform = parser.get_parsed_content("mlflow#train_handler#output_transform")
    assert transform({"loss": 0.5, "critic_loss": float("nan"), "mi_scale": 1.0}) == {"loss": 0.5, "mi_scale": 1.0}


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_the_primary_label_is_the_part_that_training_keeps_free_of_the_others(bundle: Bundle):
    # --primary of a factor that label_levels did not list first trained the first factor's part as
    # f_y (the network and the objective take the first part), while validation scored --primary.
    parser = bundle.parser()
    first, second, *_ = parser["label_levels"]
    parser["primary"] = second
    network, objective = parser.get_parsed_content("network_def"), parser.get_parsed_content("objective")
    assert network.primary == objective.primary == second
    assert objective.spurious == parser.get_parsed_content("spurious") and first in objective.spurious


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("epochs", 0, "epochs must be a whole number >= 1, got 0"),
        ("batch_size", 2.5, "batch_size must be a whole number >= 1, got 2.5"),
        ("val_interval", 0, "val_interval must be a whole number >= 1 and <= 30, got 0"),
        ("val_interval", 31, "val_interval must be a whole number >= 1 and <= 30, got 31"),  # before: no validation, no model.pt
        ("n_critic", 1.5, "n_critic must be a whole number >= 0, got 1.5"),
        ("lr", -1, "lr must be a finite number > 0, got -1"),
        ("critic_lr", "x", "critic_lr must be a finite number > 0, got 'x'"),
        ("gradnorm_lr", 0, "gradnorm_lr must be a finite number > 0, got 0"),
        ("mi_weight", "abc", "mi_weight must be a finite number >= 0, got 'abc'"),
        ("cache_rate", 2, "cache_rate must be a finite number >= 0 and <= 1, got 2"),
        ("seed", "a", "seed must be a whole number, got 'a'"),
    ],
)
def test_a_setting_out_of_range_is_refused_by_name_before_any_work(setting, value, message, at_repo_root: str, tmp_path: Path):
    # They were refused only once the datasets were loaded and cached (the trainer, the optimizers),
    # some in words naming no setting (PyTorch's "Invalid learning rate: -1"); the empty dataset_dir
    # here would be refused right after them, so a check that comes late fails this test.
    with pytest.raises(Exception) as raised:
        run("training", config_file=BUNDLES[0].config_files(), dataset_dir=str(tmp_path), bundle_root=str(tmp_path / "root"),
            **{setting: value})  # fmt: skip
    messages = [str(error) for error in error_chain(raised.value)]
    assert any(f"{message}: give --{setting} " in m for m in messages), messages
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_multi_gpu_training_runs_every_check_of_training(bundle: Bundle):
    # multi_gpu_train.json's own initialize had lost the spatial_size check of train.json's.
    parser = bundle.parser()
    parser.parse()
    single = parser.get("initialize")
    parser.read_config([str(REPO / file) for file in bundle.config_files("multi_gpu_train")])
    parser.parse()
    multi = parser.get("initialize")
    assert [item for item in single if item not in multi] == []


def test_another_backbone_than_the_one_its_options_belong_to_names_them():
    # The digits bundle's backbone_kwargs (small_cnn's dropout) went to ResNet: a bare TypeError.
    parser = BUNDLES[0].parser()
    parser["backbone"] = "resnet10"
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content("network_def")
    messages = [str(error) for error in error_chain(raised.value)]
    assert any("backbone 'resnet10' does not take an option of network_def#backbone_kwargs" in m and "'dropout'" in m
               and '--network_def#backbone_kwargs "{}"' in m for m in messages), messages  # fmt: skip
    parser["network_def"]["backbone_kwargs"] = {}
    assert parser.get_parsed_content("network_def", lazy=False).backbone.__class__.__name__ == "ResNet"
