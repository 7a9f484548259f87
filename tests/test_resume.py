"""Bundle training killed mid-epoch resumes from its checkpoint into the same MLflow run; fixed seeds repeat."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import torch
from bundle_runs import REPO, bundle_runs, checkpoint_dir, checkpoint_files, metric_steps, run_env, training_command

from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver

from mimm_med.engines import ResumeFromLatest, latest_checkpoint

EPOCHS = 3
N_CRITIC = 3  # the brain bundle's


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def kill_in_second_epoch(command: list[str], env: dict[str, str], bundle_root: Path, log: Path) -> None:
    """Start ``command`` and SIGKILL it once the first epoch's checkpoint exists and the second epoch has begun.

    The second epoch has begun when its first iteration is logged; the kill follows within one poll
    (0.1 s), well before the epoch's last iteration.
    """
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        try:
            while not (checkpoint_files(bundle_root) and f"Epoch: 2/{EPOCHS}, Iter: 1/" in log.read_text(encoding="utf-8", errors="replace")):
                assert process.poll() is None, f"training ended before it could be killed:\n{log.read_text(encoding='utf-8', errors='replace')[-4000:]}"
                assert time.monotonic() < deadline, "no checkpoint and second epoch within 600 s"
                time.sleep(0.1)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL


def test_killed_training_resumes_from_its_checkpoint_into_the_same_mlflow_run(brain_splits, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    root = tmp_path / "bundle"
    command = training_command(["train.json"], brain_splits, root, EPOCHS)
    kill_in_second_epoch(command, run_env(uri), root, tmp_path / "killed.log")

    (saved,) = checkpoint_files(root)
    assert saved.name == "checkpoint_checkpoint_epoch=1.pt"
    before = load(saved)
    (killed_run,) = bundle_runs(uri)
    assert killed_run.info.status == "RUNNING"
    assert metric_steps(uri, killed_run.info.run_id, "train/loss") == [1]

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

    final = load(latest_checkpoint(checkpoint_dir(root), "checkpoint_*.pt"))
    iterations = before["trainer"]["epoch_length"]
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
