"""Stand-in generator arguments: invalid ones are refused up front with a message that names the fix."""

from __future__ import annotations

import math

import pytest

import mimm_med.data.standins as standins
from mimm_med.cli import main
from mimm_med.data.standins import generate_cohort


@pytest.mark.parametrize(
    "kind, options, message",
    [
        ("chexpert", {"effects": {"sex": math.nan}}, r"finite numbers >= 0.*'sex': nan"),  # was NaN images
        ("ukb", {"effects": {"age": math.inf}}, r"finite numbers >= 0"),
        ("chexpert", {"effects": {"sex": "2"}}, r"finite numbers >= 0"),  # was a TypeError in a comparison
        ("ukb", {"resolution_mm": math.nan}, r"resolution_mm must be a finite number"),  # was "cannot convert NaN"
        ("chexpert", {"resolution_mm": math.inf}, r"resolution_mm must be a finite number"),  # was 16-pixel images
        ("ukb", {"resolution_mm": 25.0}, r"\[0\.5, 10\] mm, got 25"),  # was a zero-size reduction in numpy
        ("nako", {"resolution_mm": 0.1}, r"\[0\.5, 10\] mm, got 0\.1"),  # was tens of GB of memory
        ("chexpert", {"seed": -1}, r"seed must be a whole number >= 0, got -1"),  # was numpy's SeedSequence
        ("chexpert", {"seed": 1.5}, r"seed must be a whole number"),
    ],
)
def test_invalid_arguments_are_refused_before_anything_is_written(tmp_path, kind, options, message):
    out = tmp_path / "raw"
    with pytest.raises(ValueError, match=message):
        generate_cohort(kind, 1, out, progress=False, **options)
    assert not out.exists()


@pytest.mark.parametrize("n", [0, 2.5, True])
def test_the_number_of_subjects_must_be_a_whole_number(tmp_path, n):
    with pytest.raises(ValueError, match=r"n \(the number of subjects\) must be a whole number >= 1"):
        generate_cohort("chexpert", n, tmp_path / "raw", progress=False)


def test_brain_resolution_range_still_generates_at_its_ends(tmp_path):
    # 10 mm, the coarsest allowed, still has cortex and ventricles for the age effect.
    out = generate_cohort("ukb", 1, tmp_path / "coarse", resolution_mm=10.0, progress=False)
    assert len(list(out.rglob("T1.nii.gz"))) == 1


def test_a_non_empty_output_folder_is_refused_so_cohorts_never_mix(tmp_path, capsys):
    out = generate_cohort("chexpert", 3, tmp_path / "raw", seed=1, progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    # Without the check, a second cohort rewrote train.csv and left the first one's other patients behind.
    with pytest.raises(ValueError, match=r"output folder .*raw is not empty.*delete it or choose another one"):
        generate_cohort("chexpert", 2, out, seed=2, progress=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert main(["cohort", "generate", "chexpert", "--n", "2", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimm-med cohort generate: output folder") and err.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate_cohort("chexpert", 1, empty, progress=False) == empty  # an empty folder is fine


def test_cli_refuses_nan_resolution_and_effect_without_a_traceback(tmp_path, capsys):
    for option in (["--resolution-mm", "nan"], ["--resolution-mm", "inf"], ["--effect", "sex=nan"]):
        assert main(["cohort", "generate", "ukb", "--n", "1", "--out", str(tmp_path / "raw"), *option]) == 2, option
        err = capsys.readouterr().err
        assert err.startswith("mimm-med cohort generate: ") and "finite" in err and err.count("\n") == 1, err


def test_an_interrupted_generation_leaves_no_output_folder_and_the_next_run_completes(tmp_path, monkeypatch):
    def interrupted(kind, n, out, *args):
        (out / "train").mkdir()
        (out / "train" / "patient00001.jpg").write_bytes(b"half an image")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(standins, "generate_chest_xray_cohort", interrupted)
        with pytest.raises(KeyboardInterrupt):
            generate_cohort("chexpert", 2, tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()  # so the demo and the benchmark, which reuse an existing one, generate again
    out = generate_cohort("chexpert", 2, tmp_path / "raw", progress=False)
    assert (out / "train.csv").is_file() and not (out / "train" / "patient00001.jpg").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]
