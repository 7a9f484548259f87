"""MLflow tracking and registry edge cases: reruns, file-store URIs, stores the registry cannot read."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mimm_med.cli import main
from mimm_med.evaluation.report import SUPERSEDED_TAG, log_report
from mimm_med.networks import MIMMXNet
from mimm_med.tracking import ModelRegistration, list_versions, resolve_tracking_uri
from mimm_med.tracking.run_names import runs_named

PARTS = {"y": 8, "a": 4}


@pytest.fixture(autouse=True)
def _quiet_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)


def _store(folder: str | Path) -> tuple[str, MlflowClient, str]:
    """A SQLite store with one experiment (artifacts beside it); its URI, client and experiment id."""
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("edge", artifact_location=(Path(folder) / "artifacts").as_uri())


def test_a_run_that_completes_again_keeps_its_registered_version_and_the_alias_moves(tmp_path):
    uri, client, experiment = _store(tmp_path)
    net = MIMMXNet("small_cnn", PARTS, {k: 2 for k in PARTS}, backbone_kwargs={"channels": (4, 8)})

    def registration(run_id: str) -> ModelRegistration:
        handler = SimpleNamespace(cur_run=client.get_run(run_id), client=client)
        return ModelRegistration(handler, net, "edge_model", (1, 12, 12))

    first = client.create_run(experiment, run_name="first").info.run_id
    registration(first).log()
    # resumed after a kill between registering and finishing: its COMPLETED handlers run again
    again = registration(first)
    again.log()
    versions = client.search_model_versions("name = 'edge_model'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", first)]
    assert str(again.registered_version.version) == "1" and again.registered_version.aliases == ["candidate"]

    second = client.create_run(experiment, run_name="second").info.run_id
    registration(second).log()
    aliases = {str(version.version): version.aliases for version in list_versions("edge_model", uri)}
    assert aliases == {"2": ["candidate"], "1": []}


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "file:./mlruns", "mlruns", "mlruns/mlflow.db"])
def test_a_file_store_uri_is_refused_with_the_fix(uri, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"file store.*sqlite:///"):
        resolve_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ValueError, match="^MLFLOW_TRACKING_URI .*file store"):
        resolve_tracking_uri(root=tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["registry", "list", "m", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimm-med registry list: ") and "file store" in err and err.count("\n") == 1
    # MLflow's own opt-out of its refusal is honoured, and other schemes pass unchanged
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert resolve_tracking_uri(uri) == uri


def test_uris_of_other_stores_pass_unchanged():
    for uri in ("databricks", "postgresql://u@db/mlflow", "sqlite:///runs.db", "https://mlflow.example.org"):
        assert resolve_tracking_uri(uri) == uri


def test_a_store_of_another_schema_gets_one_line_and_no_alias_advice(tmp_path, capsys):
    # made under another spelling of its path: MLflow caches one store per URI, checked once
    _store(f"{tmp_path}/.")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with sqlite3.connect(tmp_path / "mlflow.db") as database:
        database.execute("UPDATE alembic_version SET version_num = 'a0a0a0a0a0a0'")
    capsys.readouterr()
    assert main(["registry", "list", "m", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimm-med registry list: ") and "schema" in err and err.count("\n") == 1
    assert main(["registry", "promote", "m", "--version", "1", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "schema" in err and "choose an alias" not in err and err.count("\n") == 1


def test_a_refused_registry_request_is_not_reported_as_a_missing_model(tmp_path, monkeypatch, capsys):
    uri, _, _ = _store(tmp_path)

    def refuse(self, name):
        raise MlflowException("Permission denied for registered model", error_code="PERMISSION_DENIED")

    monkeypatch.setattr(MlflowClient, "get_registered_model", refuse)
    with pytest.raises(MlflowException, match="Permission denied"):
        list_versions("m", uri)
    assert main(["registry", "list", "m", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "Permission denied" in err and "no registered model" not in err
    assert main(["registry", "promote", "m", "--version", "1", "--tracking-uri", uri]) == 2
    assert "choose an alias" not in capsys.readouterr().err


def _report_file(folder: Path) -> dict[str, Path]:
    path = folder / "results.md"
    path.write_text("| metric | value |\n")
    return {"markdown": path}


def test_a_second_evaluation_takes_the_name_and_the_first_is_kept_as_superseded(tmp_path):
    uri, client, experiment = _store(tmp_path)
    first = log_report({"inverted/y_bacc": 0.6}, _report_file(tmp_path), uri, "edge", "run-evaluate")
    second = log_report({"inverted/y_bacc": 0.8}, _report_file(tmp_path), uri, "edge", "run-evaluate")

    (named,) = runs_named(client, experiment, "run-evaluate")
    assert named.info.run_id == second and named.data.metrics["inverted/y_bacc"] == 0.8
    kept = client.get_run(first)
    assert kept.info.run_name.startswith("run-evaluate-superseded-") and kept.info.status == "FINISHED"
    assert kept.data.tags[SUPERSEDED_TAG] == second and kept.data.metrics["inverted/y_bacc"] == 0.6


def test_evaluation_metrics_are_dated_when_they_are_logged(tmp_path):
    # They were logged with timestamp 0: MLflow's charts dated every evaluation 1970-01-01.
    uri, client, experiment = _store(tmp_path)
    before = int(time.time() * 1000)
    run_id = log_report({"inverted/y_bacc": 0.6}, _report_file(tmp_path), uri, "edge", "run-evaluate")
    (metric,) = client.get_metric_history(run_id, "inverted/y_bacc")
    assert metric.step == 0 and before <= metric.timestamp <= int(time.time() * 1000)


def test_an_evaluation_that_fails_to_log_is_marked_failed_and_leaves_the_name_to_the_last_good_one(tmp_path):
    uri, client, experiment = _store(tmp_path)
    good = log_report({"inverted/y_bacc": 0.6}, _report_file(tmp_path), uri, "edge", "run-evaluate")
    with pytest.raises(Exception):
        log_report({"inverted/y_bacc": 0.8}, {"markdown": tmp_path / "deleted.md"}, uri, "edge", "run-evaluate")

    (named,) = runs_named(client, experiment, "run-evaluate")
    assert named.info.run_id == good and SUPERSEDED_TAG not in named.data.tags
    (failed,) = [r for r in client.search_runs([experiment]) if r.info.run_id != good]
    assert failed.info.status == "FAILED" and failed.info.run_name.startswith("run-evaluate-failed-")


@pytest.mark.parametrize("name", ["it's", 'say "x"', "both ' and \"", "a_b%"])
def test_runs_are_found_by_names_that_a_filter_string_cannot_quote(tmp_path, name):
    uri, client, experiment = _store(tmp_path)
    wanted = {client.create_run(experiment, run_name=name).info.run_id for _ in range(2)}
    for other in (name + "-evaluate", name[:-1], "axb"):
        client.create_run(experiment, run_name=other)
    assert {run.info.run_id for run in runs_named(client, experiment, name)} == wanted


@pytest.mark.parametrize("content", [b"garbage, not a database", b""])
def test_the_registry_refuses_a_file_that_is_no_mlflow_store_and_leaves_it_as_it_was(tmp_path, capsys, content):
    store = tmp_path / "other.db"
    store.write_bytes(content)
    assert main(["registry", "list", "m", "--tracking-uri", f"sqlite:///{store}"]) == 2
    assert f"{store} is " in capsys.readouterr().err
    assert store.read_bytes() == content


def test_the_registry_leaves_another_sqlite_database_untouched(tmp_path, capsys):
    store = tmp_path / "patients.db"
    with sqlite3.connect(store) as connection:
        connection.execute("CREATE TABLE patients (id TEXT)")
    before = store.read_bytes()
    assert main(["registry", "list", "m", "--tracking-uri", f"sqlite:///{store}"]) == 2
    assert "is an SQLite file but no MLflow store" in capsys.readouterr().err
    assert store.read_bytes() == before


def test_the_registry_lists_and_promotes_a_model_whose_name_holds_a_quote(tmp_path, capsys):
    uri, client, experiment = _store(tmp_path)
    for name in ("it's", "it's-other"):
        client.create_registered_model(name)
    assert main(["registry", "list", "it's", "--tracking-uri", uri]) == 0
    assert "registered model \"it's\" has no versions yet" in capsys.readouterr().out
    run = client.create_run(experiment)
    client.create_model_version("it's", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.create_model_version("it's-other", f"runs:/{run.info.run_id}/model", run.info.run_id)
    assert main(["registry", "promote", "it's", "--version", "1", "--tracking-uri", uri]) == 0
    assert main(["registry", "list", "it's", "--tracking-uri", uri]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if " INFO " not in line]  # MLflow's store log
    assert len(listed) == 3 and listed[-1].split()[:2] == ["1", "champion"], listed  # the other model's version not listed


def test_mlflow_errors_are_printed_without_the_servers_password(capsys):
    from mimm_med.commands.registry import _fail

    assert _fail("list", MlflowException("API request to http://alice:S3cret@127.0.0.1:5055/api/2.0 failed\nwith 502")) == 2
    printed = capsys.readouterr().err
    assert "S3cret" not in printed and "http://alice:***@127.0.0.1:5055/api/2.0 failed with 502" in printed


def test_run_links_are_not_printed_for_a_uri_with_a_password(monkeypatch):
    # MLflow prints "View run ... at: <URI>/#/..." on every ended run, into the scheduler's logs.
    from mimm_med.tracking.uri import keep_password_out_of_run_links

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    keep_password_out_of_run_links("http://127.0.0.1:5055")
    assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ
    keep_password_out_of_run_links("http://alice:S3cret@127.0.0.1:5055")
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"


def test_a_run_whose_server_is_gone_is_not_ended_there(tmp_path, caplog):
    # set_terminated on a dead server retried for about 4 minutes after the crash that the lost server caused.
    from mimm_med.tracking.training_run import _end_run

    ended = []
    client = SimpleNamespace(tracking_uri="http://alice:S3cret@127.0.0.1:9", set_terminated=lambda *args: ended.append(args))
    with caplog.at_level("ERROR", logger="mimm_med.tracking.training_run"):
        _end_run(client, "abc123", "FAILED", tmp_path / "models" / "erm-seed0" / "mlflow_run.json")
    assert ended == []
    assert "does not answer" in caplog.text and "abc123 stays RUNNING" in caplog.text
    assert str(tmp_path / "models" / "erm-seed0") in caplog.text and "S3cret" not in caplog.text


def test_an_evaluation_supersedes_only_evaluations_of_its_own_checkpoint(tmp_path):
    # On a shared server Bob's "erm-seed0-evaluate" renamed Alice's as superseded by his.
    uri, client, experiment = _store(tmp_path)
    alice = log_report({"inverted/y_bacc": 0.6}, _report_file(tmp_path), uri, "edge", "run-evaluate", {"checkpoint": "/home/alice/model.pt"})
    bob = log_report({"inverted/y_bacc": 0.8}, _report_file(tmp_path), uri, "edge", "run-evaluate", {"checkpoint": "/home/bob/model.pt"})
    assert {run.info.run_id for run in runs_named(client, experiment, "run-evaluate")} == {alice, bob}
    again = log_report({"inverted/y_bacc": 0.7}, _report_file(tmp_path), uri, "edge", "run-evaluate", {"checkpoint": "/home/alice/model.pt"})
    assert {run.info.run_id for run in runs_named(client, experiment, "run-evaluate")} == {again, bob}
    assert client.get_run(alice).data.tags[SUPERSEDED_TAG] == again
