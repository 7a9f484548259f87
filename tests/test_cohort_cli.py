"""``mimm-med cohort`` and ``mimm-med preprocess`` from the command line."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from monai.transforms import LoadImage
from preprocess_fixtures import identifying_values, searchable_bytes
from test_manifest import make_manifest

from mimm_med.cli import main, quiet_gpu_decoder_notices
from mimm_med.data.manifest import load_manifest, read_manifest

SUBCOMMANDS = [["preprocess"], ["cohort"], ["cohort", "generate"], ["cohort", "merge"], ["cohort", "split"],
               ["cohort", "describe"], ["cohort", "locate"]]


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: mimm-med " + " ".join(command) in capsys.readouterr().out


def test_the_command_line_parser_is_built_without_the_heavy_libraries():
    """``mimm-med --help`` and a mistyped option answer at once (it took 7 s, importing MONAI through ``demo``)."""
    probe = "import sys; from mimm_med.cli import build_parser; build_parser(); print(sorted({'monai', 'torch', 'mlflow'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def confounded_manifest(folder: Path, subjects: int = 1500, seed: int = 0) -> Path:
    """Subjects with one or two images; binary age_group, sex and cohort drawn independently."""
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 3, subjects)
    path = make_manifest(folder, n=int(images.sum()))
    table = pd.read_csv(path)
    subject = np.repeat(np.arange(subjects), images)
    table["subject_id"] = [f"sub-{s:04x}" for s in subject]
    for column, values in {"age_group": ["young", "old"], "sex": ["female", "male"], "cohort": ["ukb", "nako"]}.items():
        table[column] = np.asarray(values)[rng.integers(0, 2, subjects)][subject]
    table.to_csv(path, index=False)
    return path


def test_split_hits_the_correlations_by_subject(tmp_path, capsys):
    manifest = confounded_manifest(tmp_path / "processed", subjects=5000)  # cells big enough for ±2 points
    out = tmp_path / "splits"
    status = main(["cohort", "split", "--manifest", str(manifest), "--primary", "age_group",
                   "--spurious", "sex=0.9,cohort=0.8", "--out", str(out), "--seed", "3"])
    assert status == 0
    printed = capsys.readouterr().out
    splits = {name: read_manifest(out / f"{name}.csv") for name in
              ("train", "val", "test-iid", "test-balanced", "test-inverted")}
    total, used = len(pd.read_csv(manifest)), set().union(*(frame["image"] for frame in splits.values()))
    assert f"; {total - len(used)} of the manifest's {total} images are in no split" in printed  # none silently
    train, val = set(splits["train"]["subject_id"]), set(splits["val"]["subject_id"])
    tests = set().union(*(set(splits[name]["subject_id"]) for name in ("test-iid", "test-balanced", "test-inverted")))
    assert not train & val and not (train | val) & tests
    for frame in splits.values():
        assert len(frame) > 50 and all(os.path.exists(p) for p in frame["image"])
    cells = pd.read_csv(out / "cells.csv")
    agreement = cells.groupby(["split", "factor"])["agreement"].first()
    expected = {"train": (0.9, 0.8), "val": (0.9, 0.8), "test-iid": (0.9, 0.8), "test-balanced": (0.5, 0.5),
                "test-inverted": (0.1, 0.2)}
    for split, (sex, cohort) in expected.items():
        assert agreement[split, "sex"] == pytest.approx(sex, abs=0.02)
        assert agreement[split, "cohort"] == pytest.approx(cohort, abs=0.02)


def test_a_fixed_seed_splits_a_manifest_the_same_whatever_its_row_order(tmp_path):
    manifest = confounded_manifest(tmp_path / "processed", subjects=400)
    shuffled = tmp_path / "processed" / "shuffled.csv"
    pd.read_csv(manifest).sample(frac=1.0, random_state=1).to_csv(shuffled, index=False)
    splits = {}
    for path in (manifest, shuffled):
        out = tmp_path / path.stem
        assert main(["cohort", "split", "--manifest", str(path), "--primary", "age_group",
                     "--spurious", "sex=0.9,cohort=0.8", "--out", str(out), "--seed", "3"]) == 0
        splits[path.stem] = {name: set(read_manifest(out / f"{name}.csv")["image"]) for name in ("train", "test-inverted")}
    assert splits["manifest"] == splits["shuffled"]


def test_split_errors_name_the_problem(tmp_path, capsys):
    manifest = make_manifest(tmp_path)
    status = main(["cohort", "split", "--manifest", str(manifest), "--primary", "age",
                   "--spurious", "sex=0.9", "--out", str(tmp_path / "splits")])
    assert status == 2
    assert "exactly two values" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cohort", "split", "--manifest", str(manifest), "--primary", "sex", "--spurious", "cohort", "--out", "x"])


def test_merge_rewrites_paths_and_keeps_cohorts_apart(tmp_path, capsys):
    ukb = make_manifest(tmp_path / "ukb")
    nako = make_manifest(tmp_path / "nako", cohort="nako")
    merged_path = tmp_path / "both" / "manifest.csv"
    assert main(["cohort", "merge", str(ukb), str(nako), "--out", str(merged_path)]) == 0
    merged = pd.read_csv(merged_path)
    assert merged["image"].str.startswith("../").all()
    assert merged["cohort"].value_counts().to_dict() == {"ukb": 8, "nako": 8}
    assert all(os.path.exists(p) for p in read_manifest(merged_path)["image"])
    assert main(["cohort", "merge", str(ukb), str(ukb), "--out", str(merged_path)]) == 2
    assert "more than one" in capsys.readouterr().err


def test_describe_prints_counts_and_plots_crosstabs(tmp_path, capsys):
    manifest = confounded_manifest(tmp_path, subjects=60)
    assert main(["cohort", "describe", str(manifest), "--primary", "age_group"]) == 0
    out = capsys.readouterr().out
    assert "age_group: old" in out and "sex: female" in out and "cohort: nako" in out
    assert "age: (" in out  # many-valued numbers are counted in quartile bins
    assert (tmp_path / "manifest-crosstab.png").read_bytes().startswith(b"\x89PNG")


def test_describe_counts_missing_values_and_needs_no_labels(tmp_path, capsys):
    manifest = confounded_manifest(tmp_path, subjects=40)
    table = pd.read_csv(manifest)
    table.loc[:2, "cohort"] = np.nan
    table.to_csv(manifest, index=False)
    assert main(["cohort", "describe", str(manifest), "--primary", "age_group"]) == 0
    out = capsys.readouterr().out
    assert "sex: female" in out and "missing 3" in out

    table[["subject_id", "image", "cohort", "status"]].to_csv(manifest, index=False)
    assert main(["cohort", "describe", str(manifest)]) == 0
    assert "no label columns besides cohort" in capsys.readouterr().out

    table.iloc[:0].to_csv(manifest, index=False)
    assert main(["cohort", "describe", str(manifest)]) == 2
    assert "lists no image with status ok" in capsys.readouterr().err


CARDS = Path(__file__).parents[1] / "cohorts"
TINY_BRAIN = ["--set", "spatial_size=[16,16,16]", "--set", "spacing=[8,8,8]"]
TINY_XRAY = ["--set", "spatial_size=32"]


@pytest.fixture
def key_file(tmp_path, monkeypatch):
    monkeypatch.delenv("MIMM_MED_PSEUDONYM_KEY", raising=False)
    path = tmp_path / "pseudonym.key"
    path.write_text("0123456789abcdef0123456789abcdef\n")
    path.chmod(0o600)  # as the README makes it: a key others can read is warned of
    return path


def generate(kind: str, n: int, out: Path, *options: str) -> Path:
    assert main(["cohort", "generate", kind, "--n", str(n), "--out", str(out), "--no-progress", *options]) == 0
    return out


def preprocess(card: str, raw: Path, out: Path, key_file: Path, *options: str) -> int:
    return main(["preprocess", "--cohort", str(CARDS / card), "--raw", str(raw), "--out", str(out),
                 "--key-file", str(key_file), "--no-progress", *options])


def test_preprocess_refuses_to_run_without_a_key(tmp_path, key_file, capsys):
    status = main(["preprocess", "--cohort", str(CARDS / "ukb.yaml"), "--raw", str(tmp_path), "--out", str(tmp_path)])
    assert status == 2
    assert "no pseudonymisation key" in capsys.readouterr().err


def test_ukb_and_nako_preprocess_merge_and_validate(tmp_path, key_file, capsys):
    from mimm_med.data.cohort_card import CohortCard

    ukb = generate("ukb", 4, tmp_path / "raw-ukb", "--resolution-mm", "4")
    nako = generate("nako", 3, tmp_path / "raw-nako", "--resolution-mm", "4", "--seed", "1")
    broken = sorted(ukb.glob("*/T1/T1.nii.gz"))[0]
    broken.write_bytes(broken.read_bytes()[:1000])

    assert preprocess("ukb.yaml", ukb, tmp_path / "ukb", key_file, *TINY_BRAIN) == 1
    assert preprocess("nako.yaml", nako, tmp_path / "nako", key_file, *TINY_BRAIN, "--workers", "2") == 0
    out = capsys.readouterr().out
    assert "3 done, 0 skipped, 1 failed" in out and "reasons in" in out
    errors = pd.read_csv(tmp_path / "ukb" / "errors.csv")
    assert len(errors) == 1 and errors["file"][0].endswith("_20252_2_0/T1/T1.nii.gz")
    assert errors["subject_id"][0] in errors["file"][0]  # the eid in the path became the pseudonym

    card = CohortCard.from_yaml(CARDS / "ukb.yaml")
    ukb_table = load_manifest(tmp_path / "ukb" / "manifest.csv", card=card)
    assert len(ukb_table) == 3 and set(card.label_values) <= set(ukb_table.columns)

    merged = tmp_path / "both" / "manifest.csv"
    assert main(["cohort", "merge", str(tmp_path / "ukb" / "manifest.csv"), str(tmp_path / "nako" / "manifest.csv"),
                 "--out", str(merged)]) == 0
    assert load_manifest(merged)["cohort"].value_counts().to_dict() == {"ukb": 3, "nako": 3}
    assert main(["cohort", "describe", str(merged), "--primary", "age_group"]) == 0


def test_shards_through_the_command_line_merge_to_the_full_run(tmp_path, key_file):
    raw = generate("chexpert", 5, tmp_path / "raw")
    full_status = preprocess("chexpert.yaml", raw, tmp_path / "full", key_file, *TINY_XRAY)
    shard_status = [
        preprocess("chexpert.yaml", raw, tmp_path / "sharded", key_file, *TINY_XRAY, "--shard", f"{i}/2")
        for i in range(2)
    ]
    assert max(shard_status) == full_status  # the stand-in plants metadata problems: then 1, else 0
    parts = sorted(str(p) for p in (tmp_path / "sharded").glob("manifest-shard-*-of-2.csv"))
    assert main(["cohort", "merge", *parts, "--out", str(tmp_path / "sharded" / "manifest.csv")]) == 0
    full, sharded = (pd.read_csv(tmp_path / d / "manifest.csv").sort_values("image") for d in ("full", "sharded"))
    assert full.reset_index(drop=True).equals(sharded.reset_index(drop=True))


def test_a_set_of_the_wrong_form_exits_2_before_any_image_and_locks_nothing(tmp_path, key_file, capsys):
    raw = generate("chexpert", 3, tmp_path / "raw")
    capsys.readouterr()
    # The brain form of spatial_size: the chest X-ray pipeline resizes the longest side to one number.
    assert preprocess("chexpert.yaml", raw, tmp_path / "out", key_file, "--set", "spatial_size=[32,32]") == 2
    err = capsys.readouterr().err
    assert "spatial_size is a number in" in err and "chest_xray.json (default 256), got [32, 32]" in err
    assert not (tmp_path / "out").exists()
    assert preprocess("chexpert.yaml", raw, tmp_path / "out", key_file, *TINY_XRAY) in (0, 1)
    assert "3 done" in capsys.readouterr().out


@pytest.mark.parametrize("output_format, suffix", [("png", ".png"), ("nifti", ".nii.gz")])  # NIfTI: with a header
def test_no_dicom_identifier_or_source_id_reaches_any_output(tmp_path, key_file, capfd, output_format, suffix):
    import pydicom

    raw = generate("chexpert_plus", 6, tmp_path / "raw")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in raw.rglob("*.dcm")]
    planted = set().union(*map(identifying_values, headers))  # every PS3.15 attribute planted, private ones too
    source_ids = set(pd.read_csv(raw / "df_chexpert_plus.csv")["deid_patient_id"])
    forbidden = sorted((planted | source_ids | {str(raw)}) - {""})
    capfd.readouterr()  # what generate printed
    options = [*TINY_XRAY, "--set", f'output_format="{output_format}"', "--workers", "2"]
    assert preprocess("chexpert_plus.yaml", raw, tmp_path / "out", key_file, *options) in (0, 1)
    captured = capfd.readouterr()
    outputs = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(outputs) > len(source_ids) and any(p.name.endswith(suffix) for p in outputs)
    for path in outputs:
        content, name = searchable_bytes(path), str(path.relative_to(tmp_path / "out"))
        for text in forbidden:
            assert text.encode() not in content and text not in name, f"{text!r} leaked into {path}"
    for text in forbidden:
        assert text not in captured.out + captured.err, f"{text!r} leaked into the console"


def test_the_cli_silences_monai_gpu_decoder_notices(caplog: pytest.LogCaptureFixture):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # shown again although an earlier test may have triggered them
        quiet_gpu_decoder_notices()
        with caplog.at_level(logging.WARNING):
            LoadImage(image_only=True)  # registers every MONAI reader, the GPU DICOM decoder among them
    assert not [record for record in caplog.records if "nvImageCodec" in record.getMessage()]
    assert not [warning for warning in caught if "nvImageCodec" in str(warning.message)]


def test_another_key_is_refused_on_resume_and_on_merge(tmp_path, key_file, capsys):
    raw = generate("ukb", 6, tmp_path / "raw", "--resolution-mm", "4")
    other_key = tmp_path / "other.key"
    other_key.write_text("fedcba9876543210fedcba9876543210\n")
    assert preprocess("ukb.yaml", raw, tmp_path / "shard", key_file, *TINY_BRAIN, "--shard", "0/2") == 0
    capsys.readouterr()
    assert preprocess("ukb.yaml", raw, tmp_path / "shard", other_key, *TINY_BRAIN, "--shard", "1/2") == 2
    assert "another pseudonymisation key" in capsys.readouterr().err
    assert not list((tmp_path / "shard").glob("manifest-shard-1-*"))
    # The other shard run into a folder of its own: the merge is refused, naming both records.
    assert preprocess("ukb.yaml", raw, tmp_path / "elsewhere", other_key, *TINY_BRAIN, "--shard", "1/2") == 0
    parts = [str(tmp_path / folder / f"manifest-shard-{i}-of-2.csv") for i, folder in enumerate(("shard", "elsewhere"))]
    assert main(["cohort", "merge", *parts, "--out", str(tmp_path / "manifest.csv")]) == 2
    err = capsys.readouterr().err
    assert "different keys" in err and str(tmp_path / "shard" / "pipeline.json") in err
    assert str(tmp_path / "elsewhere" / "pipeline.json") in err and not (tmp_path / "manifest.csv").exists()


def test_outputs_that_cannot_be_written_exit_2_in_one_line(tmp_path, key_file, capsys):
    raw = generate("ukb", 2, tmp_path / "raw", "--resolution-mm", "4")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    capsys.readouterr()
    for out in (blocker, blocker / "out"):
        assert preprocess("ukb.yaml", raw, out, key_file, *TINY_BRAIN) == 2
        err = capsys.readouterr().err
        assert err == f"mimm-med preprocess: cannot write --out {out}: {blocker} is a file, not a folder; choose another folder\n"
    manifest = make_manifest(tmp_path / "ukb")
    assert main(["cohort", "merge", str(manifest), "--out", str(blocker / "manifest.csv")]) == 2
    err = capsys.readouterr().err
    assert err == f"mimm-med cohort merge: cannot write --out {blocker / 'manifest.csv'}: {blocker} is a file, not a folder; choose another folder\n"


def test_split_refuses_repeated_or_primary_factors_and_warns_of_empty_splits(tmp_path, capsys):
    manifest = confounded_manifest(tmp_path / "processed", subjects=40)
    split = ["cohort", "split", "--manifest", str(manifest), "--primary", "age_group", "--out", str(tmp_path / "s")]
    with pytest.raises(SystemExit) as exit_:
        main([*split, "--spurious", "sex=0.9,sex=0.5"])
    assert exit_.value.code == 2 and "'sex' is given twice" in capsys.readouterr().err
    assert main([*split, "--spurious", "age_group=0.9"]) == 2
    assert "--primary 'age_group' is also in --spurious" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    assert main([*split, "--spurious", "sex=0.9", "--fractions", "0.7,0,0.3"]) == 0
    err = capsys.readouterr().err
    assert "split 'val' is empty; use more subjects, a larger val fraction in --fractions" in err
    assert "split 'train' is empty" not in err and "split 'test-iid' is empty" not in err


def test_split_refuses_an_out_that_would_overwrite_its_manifest(tmp_path, capsys):
    manifest = confounded_manifest(tmp_path / "processed", subjects=40)
    in_place = manifest.with_name("train.csv")  # a split of an earlier split, written back into its folder
    manifest.rename(in_place)
    before = in_place.read_bytes()
    assert main(["cohort", "split", "--manifest", str(in_place), "--primary", "age_group", "--spurious", "sex=0.9",
                 "--out", str(in_place.parent)]) == 2  # fmt: skip
    assert f"--out {in_place.parent} would overwrite --manifest {in_place}" in capsys.readouterr().err
    assert in_place.read_bytes() == before and sorted(p.name for p in in_place.parent.glob("*.csv")) == ["train.csv"]


@pytest.mark.parametrize(
    "change, spurious, message",
    [
        (None, "sex=0.5", r"argument --spurious: sex=0.5: a shortcut correlation lies strictly between 0.5 and 1"),
        (None, "sex=1", r"argument --spurious: sex=1: a shortcut correlation lies strictly between 0.5 and 1"),
        (None, "sex=0.9,nosuch=0.9", r"manifest.csv has no column 'nosuch' \(given to --spurious\); its columns: \["),
        ({"sex": "female"}, "sex=0.9", r"manifest.csv: column 'sex' has only the value 'female' in the rows to split"),
        ({"status": "failed"}, "sex=0.9", r"manifest.csv has no image to split: no row has status 'ok'"),
    ],
)
def test_split_names_the_manifest_and_argument_behind_a_bad_request(tmp_path, capsys, change, spurious, message):
    manifest = confounded_manifest(tmp_path / "processed", subjects=40)
    if change:
        pd.read_csv(manifest).assign(**change).to_csv(manifest, index=False)
    argv = ["cohort", "split", "--manifest", str(manifest), "--primary", "age_group", "--spurious", spurious,
            "--out", str(tmp_path / "s")]  # fmt: skip
    try:
        status = main(argv)
    except SystemExit as stopped:  # argparse's refusal of the argument itself
        status = stopped.code
    assert status == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "s").exists()


def write_ukb_table(raw: Path, content: bytes) -> Path:
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "ukb_phenotypes.csv").write_bytes(content)
    return raw


@pytest.mark.parametrize(
    "content, message",
    [
        ("eid,31-0.0,21003-2.0,54-2.0\n1000001,0,64,11025\n".encode("utf-16"), "is not UTF-8 text .* as a UTF-8 CSV"),
        (b"", "is empty \\(no header row\\); check the file"),
        (b"eid,31-0.0,21003-2.0,54-2.0\n", "has a header row but no data rows"),
    ],
    ids=["utf-16", "empty", "header only"],
)
def test_unreadable_metadata_table_names_the_table_and_the_fix(tmp_path, key_file, capsys, content, message):
    raw = write_ukb_table(tmp_path / "raw", content)
    assert preprocess("ukb.yaml", raw, tmp_path / "out", key_file) == 2
    err = capsys.readouterr().err
    assert re.search(rf"ukb.yaml: metadata.tables: {re.escape(str(raw / 'ukb_phenotypes.csv'))} {message}", err), err
    assert "Traceback" not in err


def test_a_card_outside_cohorts_that_misses_its_pipeline_names_the_key_and_the_fix(tmp_path, key_file, capsys):
    card = tmp_path / "my-cards" / "mine.yaml"  # its relative pipeline is read from tmp_path
    card.parent.mkdir()
    card.write_text((CARDS / "ukb.yaml").read_text())
    raw = write_ukb_table(tmp_path / "raw", b"eid,31-0.0,21003-2.0,54-2.0\n1000001,0,64,11025\n")
    assert main(["preprocess", "--cohort", str(card), "--raw", str(raw), "--out", str(tmp_path / "out"),
                 "--key-file", str(key_file)]) == 2
    err = capsys.readouterr().err
    shipped = CARDS.parent / "preprocessing" / "brain_t1.json"
    assert f"{card}: pipeline: {tmp_path / 'preprocessing' / 'brain_t1.json'} not found" in err
    assert f"write an absolute path in the card (e.g. {shipped}), or pass --pipeline" in err
    assert main(["preprocess", "--cohort", str(card), "--raw", str(raw), "--out", str(tmp_path / "out"),
                 "--key-file", str(key_file), "--pipeline", str(tmp_path / "none.json")]) == 2
    assert f"--pipeline {tmp_path / 'none.json'}: no such file" in capsys.readouterr().err
    elsewhere = tmp_path.parent / f"{tmp_path.name}-moved" / "brain_t1.json"  # an absolute path gets no relative-path advice
    card.write_text((CARDS / "ukb.yaml").read_text().replace("preprocessing/brain_t1.json", str(elsewhere)))
    assert main(["preprocess", "--cohort", str(card), "--raw", str(raw), "--out", str(tmp_path / "out"),
                 "--key-file", str(key_file)]) == 2
    err = capsys.readouterr().err
    assert f"{card}: pipeline: {elsewhere} not found: correct the path in the card (e.g. {shipped}), or pass --pipeline" in err


def test_card_errors_on_ages_name_the_problem_once(tmp_path):
    from mimm_med.data.cohort_card import CardError, CohortCard

    card = CohortCard.from_yaml(CARDS / "ukb.yaml")
    raw = write_ukb_table(tmp_path / "raw", b"eid,31-0.0,21003-2.0,54-2.0\n1000001,0,nan,11025\n1000002,1,inf,11025\n")
    reasons = card.index(raw)[1]["reason"]
    for row in range(2):
        assert "age_group: " in reasons[row] and "is not a finite number" in reasons[row]
        assert "range []" not in reasons[row]
    write_ukb_table(tmp_path / "raw", b"eid,31-0.0,54-2.0\n1000001,0,11025\n")
    with pytest.raises(CardError, match=r"lacks column\(s\) \['21003-2\.0'\] that"):
        card.index(raw)


def locate(raw: Path, key_file: Path, *arguments: str) -> int:
    return main(["cohort", "locate", "--cohort", str(CARDS / "ukb.yaml"), "--raw", str(raw), "--key-file",
                 str(key_file), *arguments])


def test_locate_maps_errors_and_unlisted_images_back_to_raw_files_for_the_key_holder(tmp_path, key_file, capsys):
    raw = generate("ukb", 4, tmp_path / "raw", "--resolution-mm", "4")
    broken = sorted(raw.glob("*/T1/T1.nii.gz"))[0]
    broken.write_bytes(broken.read_bytes()[:1000])
    orphan = raw / "5000099_20252_2_0" / "T1" / "T1.nii.gz"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(broken.read_bytes())
    with (raw / "ukb_phenotypes.csv").open("a") as table:
        table.write(",1,61,11027,2017-10-16\n")  # line 6: no id
    capsys.readouterr()
    assert preprocess("ukb.yaml", raw, tmp_path / "out", key_file, *TINY_BRAIN) == 1
    captured = capsys.readouterr()
    assert "5000099" not in captured.out + captured.err and broken.parent.parent.name[:7] not in captured.err
    assert re.search(r"warning: 1 image files under --raw match .* no metadata row, .*: sub-[0-9a-f]{16}_20252_2_0/T1/"
                     r"T1\.nii\.gz; ", captured.err)
    errors = pd.read_csv(tmp_path / "out" / "errors.csv", dtype=str, keep_default_na=False)
    assert errors["subject_id"].tolist() == ["", errors["subject_id"][1]] and errors["subject_id"][1]
    assert errors["reason"][0].startswith("metadata: ukb_phenotypes.csv, line 6: no subject id in column 'eid'")

    assert locate(raw, key_file, "--errors", str(tmp_path / "out" / "errors.csv")) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    eid = broken.parent.parent.name.split("_")[0]
    assert lines[0][:3] == ["-", "-", "-"] and "line 6" in lines[0][3]
    assert lines[1][:3] == [errors["subject_id"][1], eid, str(broken.resolve())]
    assert locate(raw, key_file, errors["subject_id"][1]) == 0
    assert capsys.readouterr().out == f"{errors['subject_id'][1]}\t{eid}\t{broken.resolve()}\n"
    assert locate(raw, key_file, "--unlisted") == 0
    assert capsys.readouterr().out.split("\t")[1:] == ["5000099", f"{orphan.resolve()}\n"]

    other_key = tmp_path / "other.key"
    other_key.write_text("fedcba9876543210fedcba9876543210\n")
    assert locate(raw, other_key, errors["subject_id"][1]) == 2
    assert "match no subject of" in capsys.readouterr().err
    assert locate(raw, other_key, "--errors", str(tmp_path / "out" / "errors.csv")) == 2
    assert "was made with another pseudonymisation key" in capsys.readouterr().err
    assert locate(raw, key_file) == 2
    assert "give one of: SUBJECT_ID" in capsys.readouterr().err


def test_split_warns_of_a_correlation_the_cohort_cannot_supply(tmp_path, capsys):
    manifest = confounded_manifest(tmp_path / "processed", subjects=2000)
    table = pd.read_csv(manifest)
    table["sex"] = np.where(table["age_group"] == "old", "male", "female")  # no subject disagrees
    table.to_csv(manifest, index=False)
    out = tmp_path / "splits"
    assert main(["cohort", "split", "--manifest", str(manifest), "--primary", "age_group", "--spurious", "sex=0.9",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: in split 'train' sex agrees with age_group in 100\.0% of \d+ images, not the "
                     r"requested 90\.0%", err), err
    assert "warning: split 'test-inverted' is empty" in err  # no image can disagree with the label
    cells = pd.read_csv(out / "cells.csv")
    assert ((cells.split == "train") & (cells.primary == "old") & (cells.value == "female") & (cells["count"] == 0)).any()


def test_outputs_and_inputs_of_the_wrong_kind_exit_2_without_a_traceback(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    manifest = confounded_manifest(tmp_path / "processed", subjects=40)
    commands = {
        "describe": ["cohort", "describe", str(manifest), "--plot", str(blocker / "crosstab.png")],
        "generate": ["cohort", "generate", "ukb", "--n", "2", "--out", str(blocker / "raw"), "--no-progress"],
        "digits": ["cohort", "digits", "--out", str(blocker / "digits")],
        "locate": ["cohort", "locate", "--cohort", str(tmp_path), "--raw", str(tmp_path), "--key",
                   "0123456789abcdef0123", "sub-0"],
    }
    for name, command in commands.items():
        assert main(command) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"mimm-med cohort {name}: ") and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_:
        main(["cohort", "split", "--manifest", str(manifest), "--primary", "age_group", "--spurious", "sex=0.9",
              "--out", str(tmp_path / "s"), "--seed", "-1"])
    assert exit_.value.code == 2 and "argument --seed: must be at least 0, got -1" in capsys.readouterr().err


def test_merge_refuses_an_out_that_would_overwrite_one_of_its_manifests(tmp_path, capsys):
    ukb = make_manifest(tmp_path / "ukb")
    nako = make_manifest(tmp_path / "nako", cohort="nako")
    before = ukb.read_text()
    # was: merged into ukb's own manifest.csv, nako's images and all
    assert main(["cohort", "merge", str(ukb), str(nako), "--out", str(tmp_path / "nako" / ".." / "ukb" / "manifest.csv")]) == 2
    assert f"would overwrite the manifest {ukb} it merges; choose another file" in capsys.readouterr().err
    assert ukb.read_text() == before


def test_describe_bins_a_numeric_label_one_value_of_which_fills_a_quarter(tmp_path, capsys):
    manifest = make_manifest(tmp_path, n=41, age=[90.0] * 30 + list(range(11)))  # ages top-coded at 90
    assert main(["cohort", "describe", str(manifest)]) == 0  # was: ValueError: Bin edges must be unique
    assert "age: (-0.001, 10.0] 11, (10.0, 90.0] 30" in capsys.readouterr().out


def test_describe_writes_the_plot_in_the_format_its_name_asks_for(tmp_path, capsys):
    manifest = make_manifest(tmp_path)
    assert main(["cohort", "describe", str(manifest), "--plot", str(tmp_path / "crosstab.pdf")]) == 0
    assert (tmp_path / "crosstab.pdf").read_bytes().startswith(b"%PDF")  # was: PNG bytes under a .pdf name
    assert main(["cohort", "describe", str(manifest), "--plot", str(tmp_path / "crosstab.csv")]) == 2
    assert "--plot " in (err := capsys.readouterr().err) and "name a file ending in one of" in err and ".png" in err
    assert not (tmp_path / "crosstab.csv").exists()
