"""MLflow tracking: a tiny MIMM-X run with MONAI's MLFlowHandler and the mimm-med handlers, on SQLite."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sqlalchemy.orm
import torch
from ignite.engine import Engine
from mlflow import MlflowClient
from monai.data import DataLoader, Dataset
from monai.handlers import CheckpointLoader, CheckpointSaver, MLFlowHandler
from monai.utils import set_determinism

from mimm_med.cli import main
from mimm_med.engines import MIMMXObjective, MIMMXTrainer
from mimm_med.interruption import terminate_as_interrupt
from mimm_med.networks import MIMMXNet
from mimm_med.tracking import (
    EpochAverages,
    ModelRegistration,
    TrainingPlots,
    TrackingServerUnreachable,
    default_artifact_location,
    list_versions,
    load_registered_network,
    network_summary,
    printable_uri,
    promote,
    require_reachable,
    resolve_tracking_uri,
    run_tracked,
)
from mimm_med.tracking import training_run
from mimm_med.tracking.uri import using_tracking_uri
from mimm_med.tracking.served_outputs import OUTPUT_COLUMNS

PARTS = {"y": 8, "a": 4, "b": 4}
EPOCHS = 2
MODEL_NAME = "tiny_bundle"


def _loader(n: int = 32, seed: int = 0) -> DataLoader:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = np.where(rng.random(n) < 0.9, y, 1 - y)
    b = rng.integers(0, 2, n)
    images = (rng.normal(size=(n, 1, 12, 12)) + y[:, None, None, None] * 0.5).astype(np.float32)
    records = [{"image": images[i], "y": int(y[i]), "a": int(a[i]), "b": int(b[i])} for i in range(n)]
    return DataLoader(Dataset(records), batch_size=16, shuffle=True)


def _trainer() -> MIMMXTrainer:
    net = MIMMXNet("small_cnn", PARTS, {k: 2 for k in PARTS}, backbone_kwargs={"channels": (4, 8)})
    objective = MIMMXObjective.for_network("mimmx", net)
    return MIMMXTrainer(
        "cpu",
        EPOCHS,
        _loader(),
        net,
        torch.optim.Adam(net.parameters(), 1e-2),
        objective,
        torch.optim.Adam(objective.critic_parameters(), 1e-2),
        torch.optim.Adam(objective.gradnorm.parameters(), 0.025),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One training run logged to ``<root>/mlruns`` the way a bundle wires it."""
    root = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        patch.chdir(root)  # anything MLflow writes to its cwd default stays out of the repository
        uri = resolve_tracking_uri(root=root)
        config = root / "train.json"
        config.write_text(json.dumps({"epochs": EPOCHS}))
        set_determinism(0)
        trainer = _trainer()
        # close_on_complete and attaching MONAI's handler first: ours run after it closed its run.
        mlflow_handler = MLFlowHandler(
            tracking_uri=uri,
            artifact_location=default_artifact_location(root),
            experiment_name="tracking-test",
            run_name="tiny",
            iteration_log=False,
            artifacts=[str(config)],
            close_on_complete=True,
        )
        averages = EpochAverages()
        handlers = [
            mlflow_handler,
            averages,
            CheckpointSaver(str(root / "models"), trainer.checkpoint_items(), save_final=True, final_filename="l.pt"),
            TrainingPlots(mlflow_handler, averages, trainer.network, root / "plots", _loader(24, seed=1)),
            # No validation here, hence no best checkpoint: the weights at the end are registered.
            ModelRegistration(mlflow_handler, trainer.network, MODEL_NAME, (1, 12, 12), root / "models" / "model.pt"),
        ]
        for handler in handlers:
            handler.attach(trainer)
        trainer.run()
        client = MlflowClient(uri)
        run = client.search_runs([client.get_experiment_by_name("tracking-test").experiment_id])[0]
        yield SimpleNamespace(root=root, uri=uri, trainer=trainer, averages=averages, client=client, run=run)
        mlflow_handler.close()


def test_run_lives_in_the_sqlite_file_with_epoch_means_of_every_term(trained):
    assert trained.uri == f"sqlite:///{trained.root}/mlruns/mlflow.db"
    assert (trained.root / "mlruns" / "mlflow.db").is_file()
    experiment = trained.client.get_experiment(trained.run.info.experiment_id)
    assert experiment.artifact_location == (trained.root / "mlruns" / "artifacts").as_uri()
    keys = set(trained.run.data.metrics)
    assert {"train/loss", "train/loss/y", "train/mi_scale", "train/weight/a", "train/task_weight/y"} <= keys
    dependence = sorted(key for key in keys if key.startswith("train/dependence/"))
    assert dependence
    for key in dependence:
        history = trained.client.get_metric_history(trained.run.info.run_id, key)
        assert [metric.step for metric in history] == list(range(1, EPOCHS + 1))
        name = key.removeprefix("train/")
        expected = [entry[name] for entry in trained.averages.history]
        assert [metric.value for metric in history] == pytest.approx(expected)


def test_plots_and_config_are_artifacts_of_the_run(trained):
    run_id = trained.run.info.run_id
    plots = {Path(item.path).name for item in trained.client.list_artifacts(run_id, "plots")}
    assert plots == {"training_curves.png", "tsne_y_features.png"}
    assert "train.json" in {item.path for item in trained.client.list_artifacts(run_id)}
    stored = trained.root / "mlruns" / "artifacts" / run_id / "artifacts"
    assert (stored / "plots" / "training_curves.png").stat().st_size > 0


def test_network_summary_fits_an_mlflow_param_where_the_definition_does_not():
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    network = MIMMXNet("resnet50", PARTS, {k: 2 for k in PARTS}, spatial_dims=3)
    summary = network_summary(network)
    assert len(repr(network)) > MAX_PARAM_VAL_LENGTH >= len(summary)
    parameters = sum(p.numel() for p in network.parameters())
    assert summary.startswith("MIMMXNet(backbone: ResNet, shared_layer: Linear, heads: ModuleDict)")
    assert f"{parameters:,} parameters" in summary and "configs/network.txt" in summary


def test_registered_candidate_predicts_like_the_trained_network(trained):
    candidate = trained.client.get_model_version_by_alias(MODEL_NAME, "candidate")
    assert candidate.run_id == trained.run.info.run_id
    assert candidate.tags["weights"] == "end of training"
    loaded = load_registered_network(f"models:/{MODEL_NAME}@candidate", tracking_uri=trained.uri)
    network = trained.trainer.network.eval()
    x = torch.randn(3, 1, 12, 12)  # a batch size other than the example's
    with torch.no_grad():
        expected, actual = network(x), loaded(x)
    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key])
    import mlflow

    with using_tracking_uri(trained.uri):  # an example input ships with the model, as the issue asks
        model_dir = mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@candidate")
    example = mlflow.models.Model.load(model_dir).load_input_example(model_dir)
    assert example is not None and example.shape[1:] == (1, 12, 12)
    with pytest.raises(LookupError, match="candidate"):
        load_registered_network(f"models:/{MODEL_NAME}@nonexistent", tracking_uri=trained.uri)


def test_a_registered_network_serves_through_mlflow_pyfunc(trained):
    # MLflow's pyfunc (mlflow models serve) takes one output tensor; a dict used to raise a TypeError.
    import mlflow

    model_uri = f"models:/{MODEL_NAME}@candidate"
    with using_tracking_uri(trained.uri):
        served = mlflow.pyfunc.load_model(model_uri)
    columns = served.metadata.metadata[OUTPUT_COLUMNS]
    x = torch.randn(3, 1, 12, 12)
    predicted = served.predict(x.numpy())
    with torch.no_grad():
        expected = trained.trainer.network.eval()(x)
    assert set(columns) == set(expected)
    assert predicted.shape == (3, max(stop for _, stop in columns.values()))
    for name, (start, stop) in columns.items():
        np.testing.assert_allclose(predicted[:, start:stop], expected[name].numpy(), rtol=1e-5, atol=1e-6)


def test_a_registered_network_needs_nothing_that_pip_cannot_install(trained):
    """An environment built from a model's requirements (MLflow's env managers) installs them from PyPI, where mimm-med is not."""
    import mlflow

    with using_tracking_uri(trained.uri):
        exported = Path(mlflow.pyfunc.get_model_dependencies(f"models:/{MODEL_NAME}@candidate")).read_text()
    assert "torch==" in exported and "mimm-med" not in exported and "mimm_med" not in exported

    # A network torch.export rejects is pickled: its classes come with mimm-med's code, logged beside it.
    handler = SimpleNamespace(cur_run=trained.run, client=trained.client)
    registration = ModelRegistration(handler, trained.trainer.network, "tiny_pickled", (1, 12, 12), serialization_format="pickle")
    registration.run.update()
    version = registration.register(trained.trainer.network.eval(), "end of training")
    model_uri = f"models:/tiny_pickled/{version.version}"
    with using_tracking_uri(trained.uri):
        pickled = Path(mlflow.pyfunc.get_model_dependencies(model_uri)).read_text()
        model_dir = Path(mlflow.artifacts.download_artifacts(model_uri))
    assert "monai==" in pickled and "mimm-med" not in pickled
    assert (model_dir / "code" / "mimm_med" / "networks" / "mimmx_net.py").is_file()
    loaded = load_registered_network(model_uri, tracking_uri=trained.uri)
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["y_output"], trained.trainer.network.eval()(x)["y_output"])


def test_promote_moves_the_champion_alias(trained):
    first = trained.client.get_model_version_by_alias(MODEL_NAME, "candidate")
    with using_tracking_uri(trained.uri):  # the registry looks the logged model up in the global store
        second = trained.client.create_model_version(MODEL_NAME, first.source, first.run_id, model_id=first.model_id)
    promote(MODEL_NAME, first.version, tracking_uri=trained.uri)
    assert trained.client.get_model_version_by_alias(MODEL_NAME, "champion").version == first.version
    promote(MODEL_NAME, second.version, tracking_uri=trained.uri)
    aliases = {version.version: version.aliases for version in list_versions(MODEL_NAME, trained.uri)}
    assert aliases[second.version] == ["champion"] and aliases[first.version] == ["candidate"]
    with pytest.raises(LookupError, match=f"its versions: .*'{first.version}'"):
        promote(MODEL_NAME, 99, tracking_uri=trained.uri)
    with pytest.raises(LookupError, match=MODEL_NAME):
        promote("no_such_model", 1, tracking_uri=trained.uri)


def test_registry_cli_promotes_and_lists(trained, capsys):
    first = trained.client.get_model_version_by_alias(MODEL_NAME, "candidate")
    uri = ["--tracking-uri", trained.uri]
    assert main(["registry", "promote", MODEL_NAME, "--version", str(first.version), "--alias", "champion", *uri]) == 0
    assert trained.client.get_model_version_by_alias(MODEL_NAME, "champion").version == first.version
    capsys.readouterr()
    assert main(["registry", "list", MODEL_NAME, *uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert lines[0].split() == ["version", "aliases", "run_id", "run_name"]
    assert rows[str(first.version)] == ["candidate,champion", first.run_id, "tiny"]
    row = next(line for line in lines if line.split()[0] == str(first.version))
    assert row.index(first.run_id) == lines[0].index("run_id") and row.index("tiny") == lines[0].index("run_name")
    assert main(["registry", "list", "no_such_model", *uri]) == 2
    assert MODEL_NAME in capsys.readouterr().err
    assert main(["registry", "promote", MODEL_NAME, "--version", str(first.version), "--alias", "latest", *uri]) == 2
    assert "choose an alias of letters" in capsys.readouterr().err
    # before: " 1" was looked up as it stands, "has no version 1; its versions: ['2', '1']"
    assert main(["registry", "promote", MODEL_NAME, "--version", f" {first.version}", "--alias", "stable", *uri]) == 0
    assert trained.client.get_model_version_by_alias(MODEL_NAME, "stable").version == first.version
    with pytest.raises(SystemExit):
        main(["registry", "promote", MODEL_NAME, "--version", "v1", *uri])
    assert "--version: must be a whole number" in capsys.readouterr().err


def test_registry_refuses_a_folder_without_a_store(tmp_path, capsys, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert main(["registry", "list", MODEL_NAME, "--tracking-uri", uri]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["registry", "list", MODEL_NAME]) == 2
    assert not (tmp_path / "mlruns").exists()  # refusing leaves no empty store folder behind


def test_registry_names_a_tracking_server_that_does_not_answer(capsys):
    assert main(["registry", "list", MODEL_NAME, "--tracking-uri", "http://127.0.0.1:9"]) == 2
    assert "the MLflow tracking server http://127.0.0.1:9 does not answer" in capsys.readouterr().err


def test_best_checkpoint_weights_are_registered_rather_than_the_last(tmp_path):
    def net() -> MIMMXNet:
        return MIMMXNet("small_cnn", PARTS, {k: 2 for k in PARTS}, backbone_kwargs={"channels": (4, 8)})

    last, best = net(), net()
    torch.save({"network": best.state_dict(), "optimizer": {}}, tmp_path / "model.pt")
    handler = SimpleNamespace(cur_run=None, client=None)
    registration = ModelRegistration(handler, last, MODEL_NAME, (1, 12, 12), tmp_path / "model.pt")
    network, source = registration.trained_network()
    assert source == str(tmp_path / "model.pt")
    for key, value in best.state_dict().items():
        assert torch.equal(network.state_dict()[key], value)
    # ignite writes a one-entry save_dict as the bare state dict
    torch.save(best.state_dict(), tmp_path / "model.pt")
    network, _ = registration.trained_network()
    assert all(torch.equal(network.state_dict()[k], v) for k, v in best.state_dict().items())
    torch.save({"net": best.state_dict()}, tmp_path / "model.pt")
    with pytest.raises(RuntimeError, match="Unexpected key.*net"):
        registration.trained_network()


def test_epoch_averages_survive_a_checkpoint_round_trip(tmp_path):
    averages = EpochAverages()
    engine = Engine(lambda engine, batch: {"loss": float(batch), "critic_loss": math.nan})
    averages.attach(engine)
    saver = CheckpointSaver(str(tmp_path), {"epoch_averages": averages}, save_final=True, final_filename="last.pt")
    saver.attach(engine)
    engine.run([1.0, 2.0, 3.0, 4.0], max_epochs=2, epoch_length=2)
    # NaN (no critic) stays out of the means.
    assert averages.history == [{"epoch": 1, "loss": 1.5}, {"epoch": 2, "loss": 3.5}]
    assert engine.state.metrics == {"train/loss": 3.5}

    resumed = EpochAverages()
    loader = Engine(lambda engine, batch: {})
    CheckpointLoader(str(tmp_path / "last.pt"), {"epoch_averages": resumed}).attach(loader)
    loader.run([0.0], max_epochs=1)
    assert resumed.history == averages.history


def test_epoch_averages_resume_in_the_middle_of_an_epoch():
    def engine(epoch: int, loss: float) -> SimpleNamespace:
        return SimpleNamespace(state=SimpleNamespace(epoch=epoch, output={"loss": loss}, metrics={}))

    before = EpochAverages()
    before(engine(1, 1.0))
    after = EpochAverages()
    after.load_state_dict(before.state_dict())
    after(engine(1, 3.0))
    assert after.history == [{"epoch": 1, "loss": 2.0}]
    after(engine(2, 10.0))
    assert after.history == [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 10.0}]
    with pytest.raises(TypeError, match="dict of floats"):
        after(SimpleNamespace(state=SimpleNamespace(epoch=2, output=[1.0], metrics={})))


def test_handlers_do_nothing_off_rank_zero(tmp_path, monkeypatch):
    net = MIMMXNet("small_cnn", PARTS, {k: 2 for k in PARTS}, backbone_kwargs={"channels": (4, 8)})
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    # A multi-GPU bundle disables MONAI's MLFlowHandler off rank 0, so ours get None there. EpochAverages
    # runs on every rank (test_distributed_epoch_averages.py): its means are over all ranks.
    averages = EpochAverages()
    engine = Engine(lambda engine, batch: {"loss": batch})
    for handler in (
        TrainingPlots(None, averages, net, tmp_path / "plots", _loader(8)),
        ModelRegistration(None, net, MODEL_NAME, (1, 12, 12)),
    ):
        handler.attach(engine)
    engine.run([1.0, 2.0], max_epochs=1)
    assert not (tmp_path / "plots").exists()

    # On rank 0 the same handlers act, and fail for want of an MLflow run.
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    no_run = SimpleNamespace(cur_run=None, client=None)
    for handler in (TrainingPlots(no_run, averages, net, tmp_path), ModelRegistration(no_run, net, "m", (1, 12, 12))):
        with pytest.raises(RuntimeError, match="no run"):
            handler(engine)


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = resolve_tracking_uri(root="project")
    assert default == f"sqlite:///{tmp_path}/project/mlruns/mlflow.db"
    assert (tmp_path / "project" / "mlruns").is_dir()
    assert default_artifact_location("project") == (tmp_path / "project" / "mlruns" / "artifacts").as_uri()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri(root="project") == "http://mlflow.example:5000"
    assert resolve_tracking_uri("sqlite:///elsewhere/runs.db") == "sqlite:///elsewhere/runs.db"
    # A server keeps its own artifact store; a SQLite file keeps them next to it.
    assert default_artifact_location("project") is None
    assert default_artifact_location(tracking_uri="sqlite:///elsewhere/runs.db") == (
        tmp_path / "elsewhere" / "artifacts"
    ).as_uri()


def _tracked_attempt(uri: str, mi_weight: float, fresh: bool, fail: bool, record: Path | None = None) -> Engine:
    """One attempt at the run named "attempt", logging ``mi_weight`` as the bundles log their settings.

    ``record`` is the attempt's run record (a bundle keeps it in its checkpoint folder); by default one
    in the store's folder, shared by every attempt of the test, as by the attempts of one bundle folder.
    """
    record = record or Path(uri.removeprefix("sqlite:///")).parent / "mlflow_run.json"
    trainer = Engine(lambda engine, batch: (_ for _ in ()).throw(FloatingPointError("diverged")) if fail else None)
    handler = MLFlowHandler(
        tracking_uri=uri, experiment_name="attempts", run_name="attempt", experiment_param={"mi_weight": mi_weight},
        iteration_log=False, epoch_log=False, close_on_complete=True,
    )  # fmt: skip
    handler.attach(trainer)
    trainer.state.max_epochs, trainer.state.epoch_length, trainer.state.dataloader = 1, 1, [0]  # as a MONAI trainer holds its data
    run = lambda: run_tracked(trainer, handler, fresh=fresh, run_record=record)  # noqa: E731
    if fail:
        with pytest.raises(FloatingPointError):
            run()
    else:
        run()
    return trainer


def test_a_crashed_run_is_marked_failed_and_a_fresh_start_gets_a_run_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _tracked_attempt(uri, mi_weight=float("nan"), fresh=True, fail=True)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("attempts").experiment_id
    (crashed,) = client.search_runs([experiment])
    assert (crashed.info.run_name, crashed.info.status) == ("attempt", "FAILED")
    # MONAI's handler would continue the failed run and refuse the new mi_weight ("Changing param values is not allowed")
    _tracked_attempt(uri, mi_weight=1.0, fresh=True, fail=False)
    runs = {run.info.run_id: run for run in client.search_runs([experiment])}
    assert len(runs) == 2
    fresh_run = next(run for run in runs.values() if run.info.run_id != crashed.info.run_id)
    assert (fresh_run.info.run_name, fresh_run.info.status, fresh_run.data.params["mi_weight"]) == ("attempt", "FINISHED", "1.0")
    assert runs[crashed.info.run_id].info.run_name.startswith("attempt-failed-")
    assert runs[crashed.info.run_id].data.params["mi_weight"] == "nan"


@pytest.fixture
def main_thread() -> None:
    """Skip a test that sets signal handlers where it does not run in the main thread, the only one that can."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be set from the main thread")


class _Terminated(Exception):
    """What the test's own SIGTERM handler raises: the process's death, without killing the test."""


def test_a_rank_that_torchrun_terminates_as_its_collective_fails_still_marks_the_run_failed(main_thread, tmp_path, monkeypatch):
    # One DDP rank dies: the survivor's all_reduce raises, and torchrun's SIGTERM reaches it while it ends its run.
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    checks = []

    def reachable_then_terminated(tracking_uri: str) -> None:
        checks.append(tracking_uri)
        if len(checks) == 2:  # the check in ending the run, after the one before training
            os.kill(os.getpid(), signal.SIGTERM)

    def terminated(signum, frame):
        raise _Terminated

    monkeypatch.setattr(training_run, "require_reachable", reachable_then_terminated)
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        _tracked_attempt(uri, mi_weight=1.0, fresh=True, fail=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("attempts").experiment_id])
    assert len(checks) == 2 and run.info.status == "FAILED"


def test_an_interrupt_during_an_mlflow_write_is_raised_after_the_write(main_thread, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("writes")).info.run_id
    flush = sqlalchemy.orm.Session.flush

    def flush_then_terminated(self, *args, **kwargs):
        flushed = flush(self, *args, **kwargs)  # the metric's row is written, the transaction not yet committed
        os.kill(os.getpid(), signal.SIGTERM)
        return flushed

    monkeypatch.setattr(sqlalchemy.orm.Session, "flush", flush_then_terminated)
    with pytest.raises(KeyboardInterrupt), terminate_as_interrupt():
        client.log_metric(run_id, "loss", 1.0, step=1)
    monkeypatch.setattr(sqlalchemy.orm.Session, "flush", flush)
    assert [metric.value for metric in client.get_metric_history(run_id, "loss")] == [1.0]  # before: rolled back by the interrupt


def test_a_run_interrupted_at_any_moment_of_its_logging_can_be_ended(main_thread, tmp_path, monkeypatch):
    # Interrupted inside SQLAlchemy, a write left SQLite locked to the cleanup: "database is locked", run RUNNING.
    # Half the interrupts of this loop landed in a write; 6 attempts all ended the run only 1 time in 64.
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    rng = np.random.default_rng(0)
    for attempt in range(6):
        client = MlflowClient(f"sqlite:///{tmp_path / f'attempt{attempt}.db'}")
        run_id = client.create_run(client.create_experiment("loop")).info.run_id
        threading.Timer(rng.uniform(0.3, 0.8), os.kill, (os.getpid(), signal.SIGTERM)).start()
        with pytest.raises(KeyboardInterrupt), terminate_as_interrupt():
            for step in itertools.count():
                client.log_metric(run_id, "loss", float(step), step=step)
        training_run._end_run(client, run_id, "KILLED", None)
        assert client.get_run(run_id).info.status == "KILLED", attempt


def test_a_resumed_run_continues_its_unfinished_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _tracked_attempt(uri, mi_weight=1.0, fresh=True, fail=True)
    _tracked_attempt(uri, mi_weight=1.0, fresh=False, fail=False)  # a checkpoint was resumed
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("attempts").experiment_id])
    assert (run.info.run_name, run.info.status) == ("attempt", "FINISHED")


def test_runs_of_the_same_name_from_other_folders_are_left_alone(tmp_path, monkeypatch):
    # On a shared server two people's "erm-seed0": a fresh start used to fail the other's unfinished run,
    # and a resume continued whichever unfinished run of the name was newest.
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    alice, bob = tmp_path / "alice" / "mlflow_run.json", tmp_path / "bob" / "mlflow_run.json"
    _tracked_attempt(uri, mi_weight=1.0, fresh=True, fail=True, record=alice)
    _tracked_attempt(uri, mi_weight=2.0, fresh=True, fail=True, record=bob)
    _tracked_attempt(uri, mi_weight=1.0, fresh=False, fail=False, record=alice)  # Alice resumes her checkpoint
    client = MlflowClient(uri)
    runs = {run.info.run_id: run for run in client.search_runs([client.get_experiment_by_name("attempts").experiment_id])}
    alices, bobs = (runs[json.loads(record.read_text())["run_id"]] for record in (alice, bob))
    assert (alices.info.run_name, alices.info.status, alices.data.params["mi_weight"]) == ("attempt", "FINISHED", "1.0")
    assert (bobs.info.run_name, bobs.info.status, bobs.data.params["mi_weight"]) == ("attempt", "FAILED", "2.0")
    assert len(runs) == 2


def test_a_resumed_run_is_running_again_while_it_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _tracked_attempt(uri, mi_weight=1.0, fresh=True, fail=True)
    client = MlflowClient(uri)
    statuses = []
    trainer = Engine(lambda engine, batch: statuses.append(client.get_run(handler.cur_run.info.run_id).info.status))
    handler = MLFlowHandler(tracking_uri=uri, experiment_name="attempts", run_name="attempt", iteration_log=False, epoch_log=False)
    handler.attach(trainer)
    trainer.state.max_epochs, trainer.state.epoch_length, trainer.state.dataloader = 1, 1, [0]
    run_tracked(trainer, handler, fresh=False, run_record=tmp_path / "mlflow_run.json")
    assert statuses == ["RUNNING"]  # was FAILED until the run ended


def test_a_resumed_run_logs_only_the_iterations_its_killed_attempt_had_not_logged(tmp_path, monkeypatch):
    # The killed attempt logged iterations of an epoch its checkpoint does not hold; the resumed run
    # repeats them. The handler's own filter (odd iterations here) still applies.
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri, record = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlflow_run.json"

    def attempt(fresh: bool, fail_at: int | None) -> None:
        def step(engine: Engine, batch: int) -> dict[str, float]:
            if engine.state.iteration == fail_at:
                raise KeyboardInterrupt
            return {"loss": float(engine.state.iteration)}

        trainer = Engine(step)
        handler = MLFlowHandler(tracking_uri=uri, experiment_name="attempts", run_name="attempt", epoch_log=False,
                                iteration_log=lambda engine, iteration: iteration % 2 == 1, output_transform=lambda output: output)  # fmt: skip
        handler.attach(trainer)
        trainer.load_state_dict({"iteration": 0 if fresh else 4, "epoch_length": 4, "max_epochs": 2})  # a checkpoint at epoch 1
        trainer.state.dataloader = [0] * 4
        if fail_at is None:
            run_tracked(trainer, handler, fresh=fresh, run_record=record)
        else:
            with pytest.raises(KeyboardInterrupt):
                run_tracked(trainer, handler, fresh=fresh, run_record=record)

    attempt(fresh=True, fail_at=7)
    attempt(fresh=False, fail_at=None)
    run_id = json.loads(record.read_text())["run_id"]
    history = MlflowClient(uri).get_metric_history(run_id, "loss")
    assert sorted((metric.step, metric.value) for metric in history) == [(1, 1.0), (3, 3.0), (5, 5.0), (7, 7.0)]


def test_training_does_not_start_when_the_tracking_server_does_not_answer(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    steps = []
    trainer = Engine(lambda engine, batch: steps.append(batch))
    handler = MLFlowHandler(tracking_uri="http://127.0.0.1:9", experiment_name="attempts", run_name="attempt")
    handler.attach(trainer)
    with pytest.raises(TrackingServerUnreachable, match="does not answer"):
        run_tracked(trainer, handler, fresh=True)
    assert steps == []


def test_messages_show_no_tracking_store_password():
    with pytest.raises(TrackingServerUnreachable) as raised:
        require_reachable("http://mlflow:s3cret@127.0.0.1:9", timeout=1)
    assert "s3cret" not in str(raised.value) and "http://mlflow:***@127.0.0.1:9" in str(raised.value)
    assert printable_uri("postgresql://mlflow:p@ss@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
    assert printable_uri("sqlite:////data/mlruns/mlflow.db") == "sqlite:////data/mlruns/mlflow.db"


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1 issued by no authority a client trusts."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = folder / "server.pem", folder / "server.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_file, key_file


def test_a_tls_server_is_reachable_with_the_certificate_mlflow_is_told_of(tmp_path, monkeypatch):
    # The check used to ignore MLflow's TLS settings, so a server with an internal CA was refused as not answering.
    import http.server
    import ssl
    import threading

    cert_file, key_file = _self_signed_certificate(tmp_path)
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"https://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_INSECURE_TLS", raising=False)
        with pytest.raises(TrackingServerUnreachable, match="answers, but its TLS certificate could not be verified"):
            require_reachable(uri, timeout=5)
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert_file))
        require_reachable(uri, timeout=5)
        monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
        monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
        require_reachable(uri, timeout=5)
    finally:
        server.shutdown()


def test_a_run_deleted_on_the_server_is_replaced_not_updated(tmp_path, monkeypatch):
    # A recorded run deleted in the UI is still found, and every update of it was refused ("must be in the 'active' state").
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record = tmp_path / "mlflow_run.json"
    _tracked_attempt(uri, mi_weight=1.0, fresh=True, fail=True)
    client = MlflowClient(uri)
    deleted = json.loads(record.read_text())["run_id"]
    client.delete_run(deleted)
    for fresh in (False, True):  # a resume, and a fresh start that would retire it
        _tracked_attempt(uri, mi_weight=1.0, fresh=fresh, fail=False)
        assert json.loads(record.read_text())["run_id"] != deleted
        assert client.get_run(json.loads(record.read_text())["run_id"]).info.status == "FINISHED"
