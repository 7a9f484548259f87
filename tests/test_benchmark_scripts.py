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
