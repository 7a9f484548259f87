"""One rule for whole-number settings, wherever a config may give them."""

import math

import numpy as np
import pytest
import torch

from mimm_med.checks import as_flag, check_positive, is_whole_number
from mimm_med.data.digits_morpho import make_digits_morpho
from mimm_med.engines.batch_norm import RecomputeBatchNorm
from mimm_med.engines.resume import ResumeFromLatest
from mimm_med.mi import MINE
from mimm_med.networks import MIMMXNet


@pytest.mark.parametrize(
    "value, minimum, expected",
    [
        (3, None, True),
        (np.int64(3), 1, True),
        (16.0, 1, True),  # YAML and hand-written JSON give 16.0 for 16
        (0, 1, False),
        (-1, 0, False),
        (2.5, None, False),
        (True, None, False),  # a bool is an int to Python, never a count to a user
        ("3", None, False),
        (math.nan, None, False),
        (math.inf, 0, False),
        (None, None, False),
    ],
)
def test_is_whole_number(value, minimum, expected):
    assert is_whole_number(value, minimum) is expected


def test_every_setting_takes_an_integral_float_as_its_integer(tmp_path):
    net = MIMMXNet("small_cnn", {"y": 4.0, "z": 4}, {"y": 2.0, "z": 2}, spatial_dims=2)
    assert net.part_sizes == [4, 4] and net.num_classes == {"y": 2, "z": 2}
    mine = MINE(8.0, 4.0, hidden_dim=64.0, embed_dim=16.0, num_layers=2.0)
    assert (mine.dim_a, mine.dim_b) == (8, 4) and mine(torch.randn(5, 8), torch.randn(5, 4)).ndim == 0
    assert ResumeFromLatest(tmp_path, {}, keep=2.0).keep == 2
    as_float, as_int = make_digits_morpho(0.9, seed=1.0), make_digits_morpho(0.9, seed=1)
    assert [r["subject_id"] for r in as_float["train"]] == [r["subject_id"] for r in as_int["train"]]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: MIMMXNet("small_cnn", {"y": True}, {"y": 2}, spatial_dims=2), r"part 'y' needs a positive feature size"),
        (lambda: MINE(8, 2.5), r"feature sizes must be positive integers"),
        (lambda: MINE(8, 4, hidden_dim=0), r"layer widths must be whole numbers >= 1"),
        (lambda: MINE(8, 4, num_layers=1.5), r"num_layers must be a whole number >= 0"),
        (lambda tmp: ResumeFromLatest(tmp, {}, keep=True), r"keep must be a whole number >= 1"),
        (lambda: make_digits_morpho(0.9, seed=math.nan), r"seed must be a whole number >= 0"),
        (lambda: RecomputeBatchNorm([], interval=0), r"interval must be a whole number of epochs >= 1 \(the bundles' val_interval\)"),
    ],
)
def test_a_setting_that_is_not_a_whole_number_is_refused_by_name(build, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        build(tmp_path) if build.__code__.co_argcount else build()


@pytest.mark.parametrize("value, expected", [(True, True), ("false", False), (" TRUE ", True), (0, False), (1, True)])
def test_as_flag_reads_every_spelling_of_on_and_off(value, expected):
    assert as_flag(value, "balanced") is expected


@pytest.mark.parametrize("value", ["yes", "", 2, 0.0, None])
def test_as_flag_refuses_what_is_neither(value):
    with pytest.raises(ValueError, match=r"balanced is an on/off setting: give true or false \(e.g. --balanced false\)"):
        as_flag(value, "balanced")


@pytest.mark.parametrize("command", [["demo"], ["cohort", "digits", "--out", "unused"]])
@pytest.mark.parametrize("r", ["1", "0.5", "0.2", "nan"])
def test_every_command_that_sets_up_a_shortcut_refuses_a_correlation_without_one(command, r, capsys):
    from mimm_med.cli import main

    with pytest.raises(SystemExit) as stopped:
        main([*command, "--correlation", r])
    assert stopped.value.code == 2
    assert "--correlation: a shortcut correlation lies strictly between 0.5 and 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "value, whole, axes, fine",
    [
        ([96, 96, 96], True, 3, True),
        (256, True, None, True),
        ([2.0, 1.5, 2.0], False, 3, True),
        (16.0, True, None, True),
        ([96, 0, 96], True, 3, False),
        ([96, 96.5, 96], True, 3, False),
        ([2.0, -1.0, 2.0], False, 3, False),
        ([2.0, math.nan, 2.0], False, 3, False),
        ([2.0, math.inf, 2.0], False, 3, False),
        ([True, 2, 2], False, 3, False),
        ([], True, None, False),
        ([96, 96], True, 3, False),
        ([96, 96], True, None, True),
    ],
)
def test_check_positive_refuses_what_monai_would_read_as_keep_the_images_own(value, whole, axes, fine):
    if fine:
        assert check_positive(value, "spatial_size", whole=whole, axes=axes) is value
    else:
        with pytest.raises(ValueError, match=r"^spatial_size must be .*got"):
            check_positive(value, "spatial_size", whole=whole, axes=axes)
