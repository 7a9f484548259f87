"""Evaluation and inference of the digits bundle with a researcher's own checkpoints and manifests.

No training: a checkpoint of the bundle's network (or of another network) is written directly, and
the images are a few random 28² PNGs, so that each test takes seconds.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from bundle_runs import error_chain
from mlflow import MlflowClient
from monai.bundle import ConfigParser, run
from monai.transforms import Compose
from PIL import Image

from mimm_med.data.manifest import ManifestError
from mimm_med.engines import trained_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = "bundles/mimm_digits/configs"
#: Every (digit, thickness, rotation) cell twice: 16 images, each factor balanced.
CELLS = list(itertools.product((0, 1), repeat=3)) * 2



def _config_files(*workflows: str) -> list[str]:
    return [f"{CONFIGS}/{name}.json" for name in ("train", *workflows)]


def _parser(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(REPO / file) for file in _config_files()])
    for key, value in overrides.items():
        parser[key] = value
    return parser



@pytest.fixture
def splits(tmp_path: Path) -> Path:
    """A split folder of 16 random digit images (the test sets share their subjects, as `cohort split` writes them)."""
    folder = tmp_path / "splits"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (digit, thickness, rotation) in enumerate(CELLS):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / "images" / f"d{i}.png")
        rows.append({"subject_id": f"sub-{i:02d}", "image": f"images/d{i}.png", "digit": digit,
                     "thickness": thickness, "rotation": rotation, "cohort": "digits", "status": "ok"})  # fmt: skip
    for name in ("test-iid", "test-balanced", "test-inverted"):
        pd.DataFrame(rows).to_csv(folder / f"{name}.csv", index=False)
    for name in ("train", "val"):  # training's splits, of other subjects (test_inference_needs_no_training_splits goes without)
        pd.DataFrame(rows).assign(subject_id=[f"{name}-{i:02d}" for i in range(len(rows))]).to_csv(folder / f"{name}.csv", index=False)
    return folder


def _checkpoint(folder: Path, settings: dict | None = None, **overrides) -> Path:
    """``model.pt`` of the bundle's network built with ``overrides``, with ``settings.json`` if given."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"network": _parser(**overrides).get_parsed_content("network_def").state_dict()}, folder / "model.pt")
    if settings is not None:
        (folder / "settings.json").write_text(json.dumps(settings))
    return folder / "model.pt"


def test_a_cut_off_empty_or_foreign_checkpoint_is_named_with_the_fix(tmp_path: Path):
    whole = _checkpoint(tmp_path / "run")
    assert trained_checkpoint(whole) == whole
    legacy = tmp_path / "legacy.pt"  # torch.save's format before zip archives still loads
    torch.save({"network": {}}, legacy, _use_new_zipfile_serialization=False)
    assert trained_checkpoint(legacy) == legacy
    cut_off, empty, foreign = tmp_path / "cut_off.pt", tmp_path / "empty.pt", tmp_path / "image.pt"
    cut_off.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    empty.write_bytes(b"")
    foreign.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    for path, reason in [(cut_off, "its zip archive is cut off"), (empty, "the file is empty"), (foreign, "neither a zip archive nor a pickle")]:
        with pytest.raises(ValueError, match=rf"{path} cannot be loaded as a checkpoint \((it is )?{reason}.*\): copy it again"):
            trained_checkpoint(path)


def test_inference_names_a_cut_off_checkpoint_and_one_of_another_network(at_repo_root: str, splits: Path, tmp_path: Path):
    settings = {"dataset_dir": str(splits), "bundle_root": str(tmp_path / "root"), "batch_size": 16}
    whole = _checkpoint(tmp_path / "run")
    cut_off = tmp_path / "cut" / "model.pt"
    cut_off.parent.mkdir()
    cut_off.write_bytes(whole.read_bytes()[:4096])
    with pytest.raises(Exception) as raised:  # torch named no file ("OSError: [Errno 22] Invalid argument", or "failed finding central directory")
        run("inferring", config_file=_config_files("inference"), ckpt_path=str(cut_off), **settings)
    messages = [str(error) for error in error_chain(raised.value)]
    assert any(f"{cut_off} cannot be loaded as a checkpoint" in message for message in messages), messages
    other = _checkpoint(tmp_path / "parts8", part_size=8)  # copied without its settings.json
    with pytest.raises(Exception) as raised:  # torch's "Error(s) in loading state_dict", without the file
        run("inferring", config_file=_config_files("inference"), ckpt_path=str(other), **settings)
    messages = [str(error) for error in error_chain(raised.value)]
    assert any(f"{other} holds another network" in message and "size mismatch" in message for message in messages), messages


def test_inference_predicts_new_images_whose_labels_are_blank(at_repo_root: str, splits: Path, tmp_path: Path):
    # the labels of new images are what inference is for; it used to refuse "label 'digit' is missing in 16 rows"
    table = pd.read_csv(splits / "test-iid.csv")
    table["digit"] = np.nan
    table.to_csv(splits / "new.csv", index=False)
    output_dir = tmp_path / "predictions"
    run("inferring", config_file=_config_files("inference"), ckpt_path=str(_checkpoint(tmp_path / "run")),
        dataset_dir=str(splits), input_manifest=str(splits / "new.csv"), output_dir=str(output_dir), batch_size=16)  # fmt: skip
    predicted = pd.read_csv(output_dir / "predictions.csv")
    assert predicted["subject_id"].tolist() == table["subject_id"].tolist()
    assert list(predicted.columns) == ["image", "subject_id", "p_0", "p_1", "prediction", "model"]


def test_an_empty_test_set_is_named_instead_of_none_of_0_images_could_be_read(splits: Path, tmp_path: Path):
    from mimm_med.data.datalist import manifest_datalist
    from mimm_med.evaluation.report import evaluate_checkpoint

    pd.read_csv(splits / "test-inverted.csv").head(0).to_csv(splits / "test-inverted.csv", index=False)
    parser = _parser()
    levels, primary = parser["label_levels"], parser["primary"]
    with pytest.raises(ManifestError, match=rf"{splits / 'test-inverted.csv'} holds no image to evaluate .*--fractions"):
        evaluate_checkpoint(
            parser.get_parsed_content("network_def"), _checkpoint(tmp_path / "run"), splits,
            lambda path: manifest_datalist(path, levels, primary), Compose(parser.get_parsed_content("val_transforms")), primary,
            ["thickness", "rotation"], "cpu", tmp_path / "eval",
        )  # fmt: skip


def test_an_evaluation_logs_the_settings_its_checkpoint_was_trained_with(at_repo_root: str, splits: Path, tmp_path: Path):
    # trained with --mi_weight 0.5 --lr 0.002 --epochs 2, evaluated without them: the run said 1.0, 0.001, 30
    trained = {"mi_weight": 0.5, "lr": 0.002, "epochs": 2, "dataset_dir": "data/where/it/trained"}
    checkpoint = _checkpoint(tmp_path / "root" / "models" / "mimm-seed0", settings=trained)
    run("evaluating", config_file=_config_files("evaluate"), dataset_dir=str(splits), bundle_root=str(tmp_path / "root"),
        batch_size=16, estimate_residual_mi=False)  # fmt: skip
    client = MlflowClient(at_repo_root)
    (evaluation,) = client.search_runs([client.get_experiment_by_name("mimm_digits").experiment_id])
    params = evaluation.data.params
    assert (params["mi_weight"], params["lr"], params["epochs"]) == ("0.5", "0.002", "2")
    assert params["dataset_dir"] == str(splits)  # the data evaluated
    assert params["checkpoint"] == str(checkpoint.resolve()) and params["method"] == "mimm"


def test_inference_needs_no_training_splits(at_repo_root: str, splits: Path, tmp_path: Path):
    # a machine with a model and new images only: inference used to stop at "no manifest at .../train.csv"
    for name in ("train", "val"):
        (splits / f"{name}.csv").unlink()
    output_dir = tmp_path / "predictions"
    run("inferring", config_file=_config_files("inference"), ckpt_path=str(_checkpoint(tmp_path / "run")),
        dataset_dir=str(splits), input_manifest=str(splits / "test-iid.csv"), output_dir=str(output_dir))  # fmt: skip
    assert len(pd.read_csv(output_dir / "predictions.csv")) == len(CELLS)
    # and evaluation reads the test sets alone (the folder's check of shared subjects is kept)
    run("evaluating", config_file=_config_files("evaluate"), ckpt_path=str(_checkpoint(tmp_path / "run")), dataset_dir=str(splits),
        output_dir=str(tmp_path / "eval"), estimate_residual_mi=False)  # fmt: skip
    assert (tmp_path / "eval" / "results.json").is_file()


def test_inference_skips_an_image_deleted_since_the_manifest_was_written(at_repo_root: str, splits: Path, tmp_path: Path, capsys):
    # it refused every image ("1 of 16 images listed in manifest ... are missing"), though it skips an unreadable one
    gone = splits / "images" / "d0.png"
    gone.unlink()
    output_dir = tmp_path / "predictions"
    capsys.readouterr()
    run("inferring", config_file=_config_files("inference"), ckpt_path=str(_checkpoint(tmp_path / "run")),
        dataset_dir=str(splits), output_dir=str(output_dir))  # fmt: skip
    assert len(pd.read_csv(output_dir / "predictions.csv")) == len(CELLS) - 1
    out = capsys.readouterr().out
    assert f"skipped {gone}: no such file (moved or deleted since the manifest was written)" in out, out[-2000:]
    assert f"1 of {len(CELLS)} images could not be read and were skipped" in out
    for image in (splits / "images").iterdir():  # none left: the manifest was moved away from its images
        image.unlink()
    with pytest.raises(ManifestError, match=r"none of the 16 images listed in manifest .* exist .*move it back"):
        from mimm_med.data.datalist import image_datalist

        image_datalist(splits / "test-iid.csv")
