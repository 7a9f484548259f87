"""``mimm-med preprocess`` as a cluster user runs it: key files, worker counts, concurrent shards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mimm_med.cli import main
from mimm_med.data.pseudonym import PseudonymKeyError, resolve_key, write_synthetic_cohort_key

CARDS = Path(__file__).parents[1] / "cohorts"
TINY_BRAIN = ["--set", "spatial_size=[16,16,16]", "--set", "spacing=[8,8,8]"]
SECRET = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw-ukb")
    assert main(["cohort", "generate", "ukb", "--n", "2", "--out", str(out), "--no-progress",
                 "--resolution-mm", "4"]) == 0
    return out


def preprocess(raw: Path, out: Path, key_file: Path, *options: str) -> int:
    return main(["preprocess", "--cohort", str(CARDS / "ukb.yaml"), "--raw", str(raw), "--out", str(out),
                 "--key-file", str(key_file), "--no-progress", *TINY_BRAIN, *options])


def private_key(path: Path, text: str = SECRET + "\n") -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    "content, message",
    [(b"", "is empty"), (b"  \n", "is empty"), (os.urandom(8) + b"\xff\xfe" + os.urandom(22), "does not hold text")],
    ids=["empty", "blank", "binary"],
)
def test_unusable_key_files_are_user_errors(tmp_path, raw, capfd, content, message):
    key_file = tmp_path / "pseudonym.key"
    key_file.write_bytes(content)
    key_file.chmod(0o600)
    assert preprocess(raw, tmp_path / "out", key_file) == 2
    err = capfd.readouterr().err
    assert f"key file {key_file} {message}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_unreadable_key_file_is_a_user_error(tmp_path, monkeypatch):
    key_file = private_key(tmp_path / "pseudonym.key")

    def denied(self):  # the tests run as root, whom chmod does not stop
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(PseudonymKeyError, match=r"pseudonym.key cannot be read \(Permission denied\)"):
        resolve_key(key_file=key_file, environ={})


def test_a_key_file_others_can_read_is_warned_of_without_showing_the_key(tmp_path, raw, capfd):
    key_file = private_key(tmp_path / "pseudonym.key")
    assert preprocess(raw, tmp_path / "private", key_file) == 0
    assert "chmod" not in capfd.readouterr().err
    key_file.chmod(0o644)  # what `python -c ... > pseudonym.key` makes under the usual umask
    assert preprocess(raw, tmp_path / "shared", key_file) == 0
    captured = capfd.readouterr()
    assert f"key file {key_file} can be read by other users" in captured.err and f"chmod 600 {key_file}" in captured.err
    assert SECRET not in captured.out + captured.err


def test_synthetic_cohort_keys_are_private(tmp_path):
    assert write_synthetic_cohort_key(tmp_path / "k" / "pseudonym.key", "demo").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("workers", ["-1", "1.5", "many"])
def test_workers_must_be_a_whole_number_of_at_least_zero(tmp_path, raw, capfd, workers):
    with pytest.raises(SystemExit) as exit_:
        preprocess(raw, tmp_path / "out", private_key(tmp_path / "pseudonym.key"), "--workers", workers)
    assert exit_.value.code == 2
    err = capfd.readouterr().err
    assert "argument --workers: must be " in err and "at least 0, got " in err and "Traceback" not in err


def test_more_workers_than_cpus_are_capped(tmp_path, raw, capfd, monkeypatch):
    monkeypatch.setattr("mimm_med.commands.preprocess.available_cpus", lambda: 2)
    assert preprocess(raw, tmp_path / "out", private_key(tmp_path / "pseudonym.key"), "--workers", "64") == 0
    captured = capfd.readouterr()
    assert "--workers 64, but 2 CPUs are available to this process; using 2" in captured.err
    assert "2 done, 0 skipped, 0 failed" in captured.out


def test_a_key_file_saved_with_a_byte_order_mark_keeps_its_pseudonyms(tmp_path):
    plain, marked = tmp_path / "plain.key", tmp_path / "marked.key"
    plain.write_text(SECRET + "\n")
    marked.write_bytes(b"\xef\xbb\xbf" + SECRET.encode() + b"\r\n")  # the same key, as Notepad saves it
    assert resolve_key(key_file=marked, environ={}) == resolve_key(key_file=plain, environ={}) == SECRET.encode()
