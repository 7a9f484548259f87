import numpy as np
import pytest
import torch

from mimm_med.data.confounding import SPLIT_NAMES
from mimm_med.data.digits_morpho import FACTORS, PRIMARY, make_digits_morpho
from mimm_med.evaluation import flatten_metrics
from mimm_med.experiment import ExperimentConfig, run_experiment


@pytest.fixture(scope="module")
def small_sets() -> dict[str, list[dict]]:
    sets = make_digits_morpho(0.9, seed=0)
    return {name: records[:64] for name, records in sets.items()}


@pytest.mark.parametrize("recompute_bn", [False, True])
def test_recompute_bn_sets_running_statistics_from_the_final_weights(small_sets, recompute_bn):
    torch.manual_seed(0)
    config = ExperimentConfig(
        method="erm",
        epochs=2,
        batch_size=32,
        lr=1e-2,
        backbone_kwargs={"channels": (4, 8), "dropout": 0.0},
        recompute_bn=recompute_bn,
    )
    network = run_experiment(small_sets, PRIMARY, list(FACTORS), dict.fromkeys((PRIMARY, *FACTORS), 2), config)["network"]
    first_block = network.backbone.blocks[0]
    images = torch.as_tensor([r["image"] for r in small_sets["train"]])
    with torch.no_grad():
        # update_bn averages the batch means with equal weights; 64 images in batches of 32 make that the mean
        expected = first_block.conv(images).mean(dim=(0, 2, 3))

    matches = torch.allclose(first_block.adn.N.running_mean, expected, atol=1e-5)

    assert matches == recompute_bn


def test_invariant_head_replaces_the_trained_primary_head():
    sets = {name: records[:300] for name, records in make_digits_morpho(0.9, seed=0).items()}
    heads = {}
    for invariant_head in (False, True):
        config = ExperimentConfig(method="erm", epochs=1, backbone_kwargs={"channels": (4, 8)}, invariant_head=invariant_head)
        run = run_experiment(sets, PRIMARY, list(FACTORS), dict.fromkeys((PRIMARY, *FACTORS), 2), config)
        heads[invariant_head] = run["network"].heads[PRIMARY]
        assert 0.0 <= flatten_metrics(run["results"])["inverted/y_acc"] <= 1.0

    # Same seed, same backbone: only the refit changes the head.
    assert not torch.allclose(heads[False].weight, heads[True].weight)
    assert torch.equal(heads[True].weight[0], torch.zeros_like(heads[True].weight[0]))  # logits (0, s)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sets, classes: sets.pop("test-iid"), r"sets lacks \['test-iid'\]"),
        (lambda sets, classes: classes.pop("z"), r"num_classes lacks \['z'\]"),
        (lambda sets, classes: classes.update(z=1), r"\['z'\] have regression heads"),
    ],
)
def test_an_experiment_the_evaluation_would_refuse_stops_before_training(change, message, monkeypatch):
    from mimm_med import experiment

    sets = {name: [{"image": np.zeros((1, 8, 8), np.float32), "y": 0, "z": 0}] for name in SPLIT_NAMES}
    classes = {"y": 2, "z": 2}
    change(sets, classes)
    monkeypatch.setattr(experiment, "build_run", lambda *args, **kwargs: pytest.fail("trained before refusing"))
    with pytest.raises(ValueError, match=message):
        experiment.run_experiment(sets, "y", ["z"], classes, experiment.ExperimentConfig(epochs=1))
