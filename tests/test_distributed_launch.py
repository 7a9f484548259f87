"""multi_gpu_train.json started without torchrun stops at once and says how to launch it."""

from __future__ import annotations

import subprocess

from bundle_runs import REPO, run_env, training_command

from mimm_med.distributed import LAUNCHER_VARIABLES


def test_multi_gpu_training_without_torchrun_says_how_to_launch(tmp_path):
    root = tmp_path / "bundle"
    command = training_command(["train.json", "multi_gpu_train.json"], tmp_path / "splits", root, epochs=1)
    env = {k: v for k, v in run_env(f"sqlite:///{tmp_path / 'mlflow.db'}").items() if k not in LAUNCHER_VARIABLES}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert "lacks the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)" in log, log[-3000:]
    launch = (
        "torchrun --standalone --nproc_per_node=<processes> -m monai.bundle run training --config_file "
        "\"['bundles/mimmx_brain/configs/train.json','bundles/mimmx_brain/configs/multi_gpu_train.json']\""
    )
    assert launch in log
    assert not root.exists()  # stopped before any data, checkpoint or MLflow run
