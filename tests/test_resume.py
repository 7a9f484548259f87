"""Bundle training killed mid-epoch resumes from its checkpoint into the same MLflow run; fixed seeds repeat."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from bundle_runs import REPO, bundle_runs, checkpoint_dir, checkpoint_files, metric_steps, run_env, training_command

from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver

from mimm_med.engines import ResumeFromLatest, RunFinished, RunFolderConflict, latest_checkpoint
from mimm_med.engines.resume import SettingsMismatch, refuse_other_settings, require_checkpoint_settings

EPOCHS = 3
N_CRITIC = 3  # the brain bundle's


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def stop_in_second_epoch(
    command: list[str], env: dict[str, str], bundle_root: Path, log: Path, signum: int = signal.SIGKILL, epochs: int = EPOCHS
) -> int:
    """Start ``command``, send it ``signum`` once the first epoch's checkpoint exists and the second epoch has begun.

    The second epoch has begun when its second iteration is printed (the first one is then in
    MLflow, logged before the second started); the signal follows within one poll (0.1 s), well
    before the epoch's last iteration. Returns the process's exit status.
    """
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        try:
            while not (checkpoint_files(bundle_root) and f"Epoch: 2/{epochs}, Iter: 2/" in log.read_text(encoding="utf-8", errors="replace")):
                assert process.poll() is None, f"training ended before it could be stopped:\n{log.read_text(encoding='utf-8', errors='replace')[-4000:]}"
                assert time.monotonic() < deadline, "no checkpoint and second epoch within 600 s"
                time.sleep(0.1)
        finally:
            process.send_signal(signum)
            try:
                process.wait(timeout=120)
            finally:
                process.kill()  # no-op for a process that ended
    return process.returncode


def test_killed_training_resumes_from_its_checkpoint_into_the_same_mlflow_run(brain_splits, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    root = tmp_path / "bundle"
    command = training_command(["train.json"], brain_splits, root, EPOCHS)
    # the same run, not killed, side by side: the resumed run must end with its weights
    reference_log = (tmp_path / "reference.log").open("w")
    reference = subprocess.Popen(
        training_command(["train.json"], brain_splits, tmp_path / "reference", EPOCHS), cwd=REPO,
        env=run_env(f"sqlite:///{tmp_path / 'reference.db'}"), stdout=reference_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert stop_in_second_epoch(command, run_env(uri), root, tmp_path / "killed.log") == -signal.SIGKILL

    (saved,) = checkpoint_files(root)
    assert saved.name == "checkpoint_checkpoint_epoch=1.pt"
    before = load(saved)
    (killed_run,) = bundle_runs(uri)
    assert killed_run.info.status == "RUNNING"
    assert metric_steps(uri, killed_run.info.run_id, "train/loss") == [1]
    iterations = before["trainer"]["epoch_length"]
    killed_steps = metric_steps(uri, killed_run.info.run_id, "loss")
    assert killed_steps[: iterations + 1] == list(range(1, iterations + 2))  # the second epoch had begun in MLflow

    resumed = subprocess.run(command, cwd=REPO, env=run_env(uri), capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-6000:]
    assert f"resumed from {saved} at epoch 1" in log
    assert f"Epoch: 1/{EPOCHS}, Iter" not in log
    assert "restored the ranking of the best model" in log  # the first epoch's validation still counts

    (run,) = bundle_runs(uri)
    assert (run.info.run_id, run.info.status) == (killed_run.info.run_id, "FINISHED")
    epochs = list(range(1, EPOCHS + 1))
    for key in ("train/loss", "train/dependence/sex", "train/task_weight/age_group", "val_bacc"):
        assert metric_steps(uri, run.info.run_id, key) == epochs, key
    # each iteration logged once: the repeated ones of the killed epoch not again
    assert metric_steps(uri, run.info.run_id, "loss") == list(range(1, EPOCHS * iterations + 1))

    # the saver's n_saved, the checkpoint of the killed run deleted once two newer ones exist
    assert [path.name for path in checkpoint_files(root)] == [f"checkpoint_checkpoint_epoch={epoch}.pt" for epoch in (2, 3)]
    final = load(latest_checkpoint(checkpoint_dir(root), "checkpoint_*.pt"))
    assert (before["trainer"]["iteration"], final["trainer"]["iteration"]) == (iterations, EPOCHS * iterations)
    # the optimizers continued from epoch 1: their steps count each epoch once, the killed iterations not
    assert final["optimizer"]["state"][0]["step"] == EPOCHS * iterations
    assert final["gradnorm_optimizer"]["state"][0]["step"] == EPOCHS * iterations
    assert final["critic_optimizer"]["state"][0]["step"] == EPOCHS * iterations * N_CRITIC
    # GradNorm keeps the first epoch's initial losses rather than recording the resumed batch's
    initial_losses = "gradnorm.initial_losses"
    torch.testing.assert_close(final["objective"][initial_losses], before["objective"][initial_losses])
    history = final["history"]["history"]
    assert [entry["epoch"] for entry in history] == epochs
    assert history[0] == before["history"]["history"][0]

    try:
        assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text(encoding="utf-8", errors="replace")[-6000:]
    finally:
        reference.kill()
        reference_log.close()
    uninterrupted = load(latest_checkpoint(checkpoint_dir(tmp_path / "reference"), "checkpoint_*.pt"))
    different = [name for name in final["network"] if not torch.equal(final["network"][name], uninterrupted["network"][name])]
    assert not different, f"the resumed run ends with other weights than the uninterrupted one: {different}"


def test_a_scheduler_sigterm_ends_the_mlflow_run_as_killed_and_resuming_finishes_it(brain_splits, tmp_path):
    """SLURM's time limit sends SIGTERM: the run must not stay RUNNING, and the next job resumes it."""
    uri, root, epochs = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "bundle", 2
    command = training_command(["train.json"], brain_splits, root, epochs)
    log = tmp_path / "stopped.log"
    status = stop_in_second_epoch(command, run_env(uri), root, log, signal.SIGTERM, epochs)
    assert status != 0 and status != -signal.SIGTERM, log.read_text(encoding="utf-8", errors="replace")[-4000:]
    assert "KeyboardInterrupt" in log.read_text(encoding="utf-8", errors="replace")
    (stopped,) = bundle_runs(uri)
    assert stopped.info.status == "KILLED"

    resumed = subprocess.run(command, cwd=REPO, env=run_env(uri), capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-6000:]
    (run,) = bundle_runs(uri)
    assert (run.info.run_id, run.info.status) == (stopped.info.run_id, "FINISHED")
    assert metric_steps(uri, run.info.run_id, "train/loss") == [1, 2]


def test_fixed_seed_training_repeats_exactly_on_cpu(brain_splits, tmp_path):
    runs = {}
    for name in ("first", "second"):  # side by side: the same seed, separate folders and stores
        command = training_command(["train.json"], brain_splits, tmp_path / name, epochs=1)
        env = run_env(f"sqlite:///{tmp_path / name}.db")
        with (tmp_path / f"{name}.log").open("w") as log:
            runs[name] = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for name, process in runs.items():
            assert process.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text(encoding="utf-8", errors="replace")[-6000:]
    finally:
        for process in runs.values():
            process.kill()  # no-op for a finished process
    finals = [load(latest_checkpoint(checkpoint_dir(tmp_path / name), "checkpoint_*.pt")) for name in runs]
    for part in ("network", "objective"):
        first, second = (final[part] for final in finals)
        assert first.keys() == second.keys()
        different = [name for name in first if not torch.equal(first[name], second[name])]
        assert not different, f"{part} differs between two runs of the same seed: {different}"


def test_a_checkpoint_truncated_by_a_kill_while_saving_is_skipped(tmp_path, caplog):
    torch.save({"epoch": 1}, tmp_path / "checkpoint_1.pt")
    whole = (tmp_path / "checkpoint_1.pt").read_bytes()
    time.sleep(0.01)  # a later modification time
    (tmp_path / "checkpoint_2.pt").write_bytes(whole[: len(whole) // 2])
    assert latest_checkpoint(tmp_path, "checkpoint_*.pt") == tmp_path / "checkpoint_1.pt"
    assert "skipping" in caplog.text and "checkpoint_2.pt" in caplog.text
    (tmp_path / "checkpoint_1.pt").unlink()
    assert latest_checkpoint(tmp_path, "checkpoint_*.pt") is None


def test_checkpoints_stamped_in_the_same_clock_tick_are_ordered_by_their_epoch(tmp_path):
    # seen as a flaky resume test: epochs 1 and 2 saved within the kernel's coarse file-time tick
    stamp = time.time_ns()
    for epoch in (10, 2, 9):
        path = tmp_path / f"checkpoint_trainer_epoch={epoch}.pt"
        torch.save({"epoch": epoch}, path)
        os.utime(path, ns=(stamp, stamp))
    assert latest_checkpoint(tmp_path, "checkpoint_*.pt").name == "checkpoint_trainer_epoch=10.pt"


def _validated_run(save_dir: Path, scores: list[float], resume: bool) -> CheckpointSaver:
    """An evaluator whose key metric takes ``scores`` epoch by epoch, saving the best model as the bundles do."""
    network = torch.nn.Linear(2, 1)
    evaluator = Engine(lambda engine, batch: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _score(engine: Engine) -> None:
        engine.state.metrics["bacc"] = scores[engine.state.epoch - 1]
        network.bias.data.fill_(engine.state.epoch)  # tells which epoch's model was saved

    saver = CheckpointSaver(
        str(save_dir), {"network": network, "validation": evaluator}, save_key_metric=True, key_metric_name="bacc",
        key_metric_filename="model.pt", key_metric_save_state=True,
    )  # fmt: skip
    saver.attach(evaluator)
    if resume:
        ResumeFromLatest(save_dir, {}, best_model_saver=saver)._restore_best_model_ranking()
    evaluator.run([0], max_epochs=len(scores))
    return saver


def test_resume_keeps_the_best_model_of_the_epochs_before_the_kill(tmp_path):
    _validated_run(tmp_path, [0.5, 0.9], resume=False)  # killed after epoch 2, the best so far
    assert load(tmp_path / "model.pt")["network"]["bias"].item() == 2
    for resume, kept_epoch in ((False, 1), (True, 2)):
        folder = tmp_path / str(resume)
        shutil.copytree(tmp_path, folder, ignore=shutil.ignore_patterns("False", "True"))
        _validated_run(folder, [0.7], resume=resume)  # the resumed run's first validation is worse
        # without the restored ranking, the worse model of the resumed epoch would replace the best
        assert load(folder / "model.pt")["network"]["bias"].item() == kept_epoch


class Killed(Exception):
    """Stands for the SIGKILL of a run."""


def _counting_run(
    folder: Path, epochs: int, settings: dict, killed_after: int | None = None, killed_on_completion: bool = False
) -> tuple[Engine, ResumeFromLatest]:
    """A trainer of ``epochs`` epochs that checkpoints into ``folder`` as the bundles do, with ``settings`` recorded.

    It is killed after the checkpoint of epoch ``killed_after``, or in its first ``COMPLETED`` handler
    (registering the model), where asked; ``trainer.started`` and ``trainer.completed`` count those events.
    """
    trainer = Engine(lambda engine, batch: None)
    trainer.started, trainer.completed = [], []
    trainer.add_event_handler(Events.STARTED, lambda engine: trainer.started.append(True))  # as MLflow's handler, attached earlier
    trainer.state.max_epochs, trainer.state.device = epochs, "cpu"  # as MONAI's workflows set them
    resume = ResumeFromLatest(folder, {"trainer": trainer}, keep=2, settings=settings)
    resume.attach(trainer)
    CheckpointSaver(str(folder), {"trainer": trainer}, save_interval=1, epoch_level=True, n_saved=2, file_prefix="checkpoint").attach(trainer)

    def kill(engine: Engine) -> None:
        raise Killed

    if killed_after is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=killed_after), kill)

    @trainer.on(Events.COMPLETED)
    def register(engine: Engine) -> None:
        trainer.completed.append(engine.state.epoch)
        if killed_on_completion:
            kill(engine)

    return trainer, resume


def test_a_checkpoint_is_resumed_only_with_its_own_settings_and_only_while_unfinished(tmp_path):
    trainer, resume = _counting_run(tmp_path, 3, {"mi_weight": 1.0, "spatial_size": (32, 32)}, killed_after=1)
    assert resume.checkpoint is None
    with pytest.raises(Killed):
        trainer.run([0, 1], max_epochs=3)
    assert json.loads((tmp_path / "settings.json").read_text()) == {"mi_weight": 1.0, "spatial_size": [32, 32]}

    trainer, resume = _counting_run(tmp_path, 3, {"mi_weight": 1.0, "spatial_size": [32, 32]})  # a tuple reads back as a list
    assert resume.checkpoint is not None
    trainer.run([0, 1], max_epochs=3)
    assert trainer.state.iteration == 6  # resumed after epoch 1, so two epochs of two iterations ran here
    assert trainer.completed == [3]
    with pytest.raises(RunFolderConflict, match=r"holds checkpoints of a run with other settings \(mi_weight: 1.0 there, 0.5 now\).*--run_name"):
        _counting_run(tmp_path, 3, {"mi_weight": 0.5, "spatial_size": [32, 32]})
    with pytest.raises(RunFinished, match=r"has finished: checkpoint_trainer_epoch=3.pt holds epoch 3 of 3.*Evaluate it") as error:
        _counting_run(tmp_path, 3, {"mi_weight": 1.0, "spatial_size": [32, 32]})
    assert str(tmp_path) in str(error.value)


def test_a_trained_network_is_evaluated_only_with_the_settings_that_its_numbers_depend_on(tmp_path, caplog):
    levels = {"age_group": ["young", "old"], "sex": ["female", "male"], "cohort": ["nako", "ukb"]}
    network = "MIMMXNet(\n  (heads): ModuleDict(\n    (age_group): Linear\n    (sex): Linear\n  )\n)"
    trained = {"label_levels": levels, "primary": "age_group", "spatial_size": (16, 16), "epochs": 3, "network_def": network}
    _counting_run(tmp_path, 3, trained)  # a fresh run records its settings
    checkpoint = tmp_path / "model.pt"
    # the epochs change no number, and a setting that the record lacks (an older run's) is not checked
    require_checkpoint_settings(checkpoint, {**trained, "epochs": 20, "part_size": 16})
    swapped = {"age_group": ["old", "young"], "sex": ["female", "male"], "cohort": ["nako", "ukb"]}
    other_network = network.replace("(age_group)", "(x)").replace("(sex)", "(age_group)").replace("(x)", "(sex)")
    with pytest.raises(SettingsMismatch) as refused:
        require_checkpoint_settings(checkpoint, {**trained, "label_levels": swapped, "spatial_size": [24, 24], "network_def": other_network})
    message = str(refused.value)
    assert str(tmp_path / "settings.json") in message
    assert f"  label_levels: {levels!r} in training, {swapped!r} now" in message
    assert "  network_def: line 3 is '(age_group): Linear' in training, '(sex): Linear' now" in message
    assert "  spatial_size: [16, 16] in training, [24, 24] now" in message
    # the factors in their trained order: the order of the network's parts
    assert message.endswith(f'add --label_levels "{levels!r}" --spatial_size "[16, 16]"; build its network as in training '
                            "(e.g. the same --backbone; network_def of that record is its definition)")
    with caplog.at_level(logging.WARNING, logger="mimm_med.engines.resume"):
        require_checkpoint_settings(tmp_path / "elsewhere" / "model.pt", {})  # no record: nothing to check, and it says so
    assert f"{tmp_path / 'elsewhere' / 'settings.json'} is missing, so this run's settings cannot be checked" in caplog.text
    # settings read back as Python values (a registered model's MLflow params) keep their tuples
    refuse_other_settings({**trained, "spatial_size": [16, 16]}, trained, "the params of a run")


def test_a_resumed_run_keeps_as_many_checkpoints_as_its_saver_and_a_fallback_until_then(tmp_path):
    trainer, _ = _counting_run(tmp_path, 6, {"lr": 1e-3}, killed_after=2)
    with pytest.raises(Killed):
        trainer.run([0], max_epochs=6)
    trainer, _ = _counting_run(tmp_path, 6, {"lr": 1e-3}, killed_after=3)
    with pytest.raises(Killed):
        trainer.run([0], max_epochs=6)
    # one checkpoint of its own: the one it resumed from is still there to fall back on
    assert sorted(path.name for path in tmp_path.glob("checkpoint_*.pt")) == [f"checkpoint_trainer_epoch={epoch}.pt" for epoch in (1, 2, 3)]
    trainer, _ = _counting_run(tmp_path, 6, {"lr": 1e-3})
    trainer.run([0], max_epochs=6)
    assert sorted(path.name for path in tmp_path.glob("checkpoint_*.pt")) == [f"checkpoint_trainer_epoch={epoch}.pt" for epoch in (5, 6)]


def test_a_run_killed_after_its_last_checkpoint_finishes_without_training_again(tmp_path):
    trainer, _ = _counting_run(tmp_path, 2, {"lr": 1e-3}, killed_on_completion=True)
    with pytest.raises(Killed):
        trainer.run([0, 1], max_epochs=2)  # every epoch saved, the model not yet registered
    trainer, resume = _counting_run(tmp_path, 2, {"lr": 1e-3})
    assert resume.checkpoint.name == "checkpoint_trainer_epoch=2.pt"
    trainer.run([0, 1], max_epochs=2)
    assert (trainer.state.epoch, trainer.state.iteration, trainer.completed) == (2, 4, [2])  # no epoch ran again
    with pytest.raises(RunFinished):
        _counting_run(tmp_path, 2, {"lr": 1e-3})


def test_a_record_older_than_a_setting_still_resumes(tmp_path):
    trainer, _ = _counting_run(tmp_path, 3, {"mi_weight": 1.0}, killed_after=1)
    with pytest.raises(Killed):
        trainer.run([0, 1], max_epochs=3)
    # before: "val_interval: None there, 1 now", for every run folder made before the setting was recorded
    trainer, resume = _counting_run(tmp_path, 3, {"mi_weight": 1.0, "val_interval": 1})
    assert resume.checkpoint is not None
    with pytest.raises(RunFolderConflict, match=r"mi_weight: 1.0 there, 0.5 now"):  # what it records is still checked
        _counting_run(tmp_path, 3, {"mi_weight": 0.5, "val_interval": 1})


def test_the_folder_is_checked_before_any_started_handler_runs(tmp_path):
    trainer, _ = _counting_run(tmp_path, 1, {"lr": 1e-3})
    trainer.run([0], max_epochs=1)
    assert trainer.started == [True]
    trainer = Engine(lambda engine, batch: None)
    started = []
    trainer.add_event_handler(Events.STARTED, lambda engine: started.append(True))
    trainer.state.max_epochs = 1
    with pytest.raises(RunFolderConflict):
        ResumeFromLatest(tmp_path, {"trainer": trainer}, settings={"lr": 1e-2}).attach(trainer)
    assert started == []  # MLflow's STARTED handler would have reopened the run


def test_a_checkpoint_without_its_settings_record_is_resumed_with_a_warning(tmp_path, caplog):
    trainer, _ = _counting_run(tmp_path, 3, {"mi_weight": 1.0}, killed_after=1)
    with pytest.raises(Killed):
        trainer.run([0, 1], max_epochs=3)
    (tmp_path / "settings.json").unlink()  # as a folder written before the record existed, or copied without it
    with caplog.at_level(logging.WARNING, logger="mimm_med.engines.resume"):
        trainer, resume = _counting_run(tmp_path, 3, {"mi_weight": 0.5})
    assert f"{tmp_path / 'settings.json'} is missing" in caplog.text and "resuming from checkpoint_trainer_epoch=1.pt" in caplog.text
    trainer.run([0, 1], max_epochs=3)
    assert trainer.state.iteration == 6 and not (tmp_path / "settings.json").exists()  # resumed; no record made up after the fact
