"""The timing benchmarks run end to end on tiny inputs and report every figure they promise (no timing is asserted)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, capture_output=True,
                            encoding="utf-8", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_step_overhead_times_erm_and_mimmx_and_writes_their_ratio(tmp_path):
    out = _run("step_overhead.py", "--spatial-size", "16", "--batch-size", "2", "--steps", "2", "--warmup", "1",
               "--threads", "1", "--json", str(tmp_path / "steps.json"))
    result = json.loads((tmp_path / "steps.json").read_text())
    assert [timing["method"] for timing in result["timings"]] == ["erm", "mimmx"]
    assert all(timing["median_ms"] > 0 and timing["volumes_per_s"] > 0 for timing in result["timings"])
    ratio = result["timings"][1]["median_ms"] / result["timings"][0]["median_ms"]
    assert abs(result["ratio_mimmx_to_erm"]["off"] - ratio) < 1e-9
    assert re.search(rf"MIMM-X / ERM, amp off: {ratio:.2f} \(target ≤ 1\.3: (ok|above target)\)", out), out


def test_preprocess_throughput_reports_the_three_configurations():
    out = _run("preprocess_throughput.py", "--n", "2", "--workers", "2", "--repeats", "1")
    rows = re.findall(r"^\((a|b|c)\) .*?\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, flags=re.MULTILINE)
    assert [row[0] for row in rows] == ["a", "b", "c"], out
    for _, per_second, seconds, *_ in rows:
        assert float(per_second) > 0 and abs(float(per_second) * float(seconds) - 1) < 0.05
    assert "2 done, 0 skipped, 0 failed" in out


def test_mi_estimators_reports_every_estimator_at_every_true_mi_with_its_spread(tmp_path):
    out = _run("mi_estimators.py", "--steps", "2", "--eval-batches", "2", "--skip-speed", "--threads", "1",
               "--json", str(tmp_path / "mi.json"))
    result = json.loads((tmp_path / "mi.json").read_text())
    cells = {(row["estimator"], row["true_mi"]) for row in result["accuracy"]}
    assert cells == {(name, mi) for name in result["config"]["estimators"] for mi in (0.0, 1.0, 2.0, 4.0)}
    assert all(row["std"] > 0 for row in result["accuracy"]), "two fresh batches never give the same estimate"
    assert result["speed"] == [] and {target["target"] for target in result["targets"]} >= {
        "MINE within 0.03 nats of 0 (independent)"}  # fmt: skip
    assert "wrote" in out


def test_mi_estimators_refuses_a_single_evaluation_batch_before_training():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "mi_estimators.py"), "--eval-batches", "1"],
                            cwd=REPO, capture_output=True, encoding="utf-8", timeout=120)
    assert result.returncode == 2 and "--eval-batches: must be at least 2, got 1" in result.stderr
    assert "torch" not in result.stdout, "it stopped before printing its set-up, let alone training"


def test_leakage_removal_writes_one_leakage_curve_per_estimator(tmp_path):
    _run("leakage_removal.py", "--estimators", "gaussian,club", "--pretrain-epochs", "1", "--steps", "2",
         "--report-every", "1", "--batch-size", "32", "--json", str(tmp_path / "curves.json"))
    results = json.loads((tmp_path / "curves.json").read_text(), parse_constant=lambda constant: 1 / 0)
    assert [result["estimator"] for result in results] == ["gaussian", "club"]
    for result in results:
        assert [point["step"] for point in result["curve"]] == [0, 1, 2]
        assert all(0.0 <= point[factor] <= 1.0 for point in result["curve"] for factor in ("thickness", "rotation"))
        assert all("dependence" in point for point in result["curve"][1:])
