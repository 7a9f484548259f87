"""InvariantHeadRefit: the primary head refitted on f_y with the spurious factors' linear traces erased."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset
from sklearn.linear_model import LogisticRegression

from mimm_med.engines import InvariantHeadRefit
from mimm_med.networks import MIMMXNet

FEATURES = 8


def _records(n: int, correlation: float, seed: int) -> list[dict]:
    """A weak causal feature (column 0), a strong shortcut that agrees with y at ``correlation`` (column 1), noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    z = np.where(rng.random(n) < correlation, y, 1 - y)
    x = rng.normal(size=(n, FEATURES))
    x[:, 0] += 2 * y - 1
    x[:, 1] = 3 * (2 * z - 1) + 0.5 * x[:, 1]
    return [{"image": x[i].astype(np.float32), "y": int(y[i]), "z": int(z[i])} for i in range(n)]


def _identity_network(num_classes: int = 2) -> MIMMXNet:
    """f_y is the input itself: a flatten backbone and an identity shared layer."""
    network = MIMMXNet(torch.nn.Flatten(), {"y": FEATURES, "z": 1}, {"y": num_classes, "z": 2}, backbone_dim=FEATURES)
    with torch.no_grad():
        network.shared_layer.weight.copy_(torch.cat([torch.eye(FEATURES), torch.zeros(1, FEATURES)]))
        network.shared_layer.bias.zero_()
    return network


def _loader(records: list[dict]) -> DataLoader:
    return DataLoader(Dataset(records), batch_size=256)


def _arrays(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([r["image"] for r in records]), np.array([r["y"] for r in records])


def _predict(network: MIMMXNet, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return network.heads["y"](torch.as_tensor(images)).argmax(dim=1).numpy()


def test_refitted_head_ignores_a_planted_shortcut():
    train, inverted = _records(2000, 0.9, seed=0), _records(1000, 0.1, seed=1)
    network = _identity_network()
    InvariantHeadRefit(_loader(train), "y", ["z"]).refit(network)
    x_train, y_train = _arrays(train)
    x_inverted, y_inverted = _arrays(inverted)

    plain = LogisticRegression().fit(x_train, y_train).score(x_inverted, y_inverted)
    refitted = np.mean(_predict(network, x_inverted) == y_inverted)

    assert plain < 0.6  # the shortcut pulls a plain head towards chance
    assert refitted > 0.75  # column 0 alone gives about 0.84


def test_held_out_images_erase_the_factor_where_the_network_encodes_it_for_unseen_subjects():
    # Training images carry the factor in column 1; held-out and test images, as for subjects the network
    # never memorized, also in column 2.
    def unseen(records: list[dict]) -> list[dict]:
        return [{**r, "image": r["image"] + np.float32([0, 0, 2 * r["z"]] + [0] * (FEATURES - 3))} for r in records]

    train, held_out, test = _records(2000, 0.9, seed=0), unseen(_records(2000, 0.9, seed=2)), unseen(_records(2000, 0.5, seed=3))
    x_test, y_test = _arrays(test)
    z_test = np.array([r["z"] for r in test])

    def test_gap(network: MIMMXNet) -> float:
        with torch.no_grad():
            f_y = network(torch.as_tensor(x_test))["y_features"].numpy()
        return max(np.linalg.norm(f_y[(y_test == c) & (z_test == 1)].mean(0) - f_y[(y_test == c) & (z_test == 0)].mean(0)) for c in (0, 1))

    training_only, with_held_out = _identity_network(), _identity_network()
    InvariantHeadRefit(_loader(train), "y", ["z"]).refit(training_only)
    InvariantHeadRefit(_loader(train), "y", ["z"], held_out_loader=_loader(held_out)).refit(with_held_out)

    # Two training directions go: column 1 and the difference of the two classes' estimates (noise), which
    # takes part of column 2 with it; the rest of column 2's gap of 2 stays.
    assert test_gap(training_only) > 1.0
    assert test_gap(with_held_out) < 0.4  # sampling noise of the cells (about 0.2 here)
    assert np.mean(_predict(with_held_out, x_test @ _erased_rows(with_held_out)) == y_test) > 0.7  # column 0 stays


def _erased_rows(network: MIMMXNet) -> np.ndarray:
    """The map from input to f_y that the refit folded into the identity shared layer."""
    return network.shared_layer.weight[:FEATURES].detach().numpy().T


def test_refitted_head_is_constant_along_the_factor_direction():
    train = _records(2000, 0.9, seed=0)
    network = _identity_network()
    InvariantHeadRefit(_loader(train), "y", ["z"]).refit(network)
    x, y = _arrays(train)
    z = np.array([r["z"] for r in train])
    direction = x[(y == 0) & (z == 1)].mean(axis=0) - x[(y == 0) & (z == 0)].mean(axis=0)

    with torch.no_grad():
        logits = network.heads["y"](torch.as_tensor(x))
        moved = network.heads["y"](torch.as_tensor(x + 5 * direction.astype(np.float32)))

    assert torch.allclose(logits, moved, atol=1e-4)
    assert not torch.allclose(logits, network.heads["y"](torch.as_tensor(x + 5 * np.eye(FEATURES, dtype=np.float32)[0])))


def test_refit_names_the_empty_cell():
    train = _records(200, 1.0, seed=0)  # z always agrees with y: no (y, z) cell against it

    with pytest.raises(ValueError, match=r"no training sample has y = 0 with z = \[1\]"):
        InvariantHeadRefit(_loader(train), "y", ["z"]).refit(_identity_network())


@pytest.mark.parametrize("num_classes, head_hidden", [(1, 0), (2, 8)], ids=["regression", "hidden layer"])
def test_refit_needs_a_linear_classification_head(num_classes, head_hidden):
    network = MIMMXNet(torch.nn.Flatten(), {"y": FEATURES, "z": 1}, {"y": num_classes, "z": 2}, backbone_dim=FEATURES,
                       head_hidden=head_hidden)  # fmt: skip

    with pytest.raises(ValueError, match="needs a linear classification head"):
        InvariantHeadRefit(_loader(_records(64, 0.9, seed=0)), "y", ["z"]).refit(network)


def test_handler_on_a_trainer_refits_once_when_training_completes():
    engine = Engine(lambda engine, batch: None)
    engine.network = _identity_network()
    handler = InvariantHeadRefit(_loader(_records(200, 0.9, seed=0)), "y", ["z"])
    calls = []
    refit = handler.refit
    handler.refit = lambda network: calls.append(refit(network))
    handler.attach(engine)

    engine.run([0], max_epochs=4)

    assert len(calls) == 1
    assert torch.equal(engine.network.heads["y"].weight[0], torch.zeros(FEATURES))  # binary: logits (0, s)


def test_temporary_refit_holds_during_each_validation_and_the_trained_weights_return_after():
    validator = Engine(lambda engine, batch: None)
    validator.network = _identity_network()
    trained = {key: value.clone() for key, value in validator.network.state_dict().items()}
    InvariantHeadRefit(_loader(_records(200, 0.9, seed=0)), "y", ["z"], temporary=True).attach(validator)
    seen = []
    validator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(e.network.heads["y"].weight.clone()))

    for _ in range(2):  # a validator runs once per validated epoch
        validator.run([0], max_epochs=1)
        restored = validator.network.state_dict()
        assert all(torch.equal(restored[key], value) for key, value in trained.items())

    assert len(seen) == 2
    for weight in seen:  # the validation saw the refitted head, not the trained one
        assert torch.equal(weight[0], torch.zeros(FEATURES)) and not torch.equal(weight, trained["heads.y.weight"])


def test_refit_erases_the_factor_from_f_y_itself():
    train = _records(2000, 0.9, seed=0)
    network = _identity_network()
    x, y = _arrays(train)
    z = np.array([r["z"] for r in train])

    def gaps(f_y: np.ndarray) -> np.ndarray:
        return np.array([np.abs(f_y[(y == c) & (z == 1)].mean(0) - f_y[(y == c) & (z == 0)].mean(0)).max() for c in (0, 1)])

    with torch.no_grad():
        before = network(torch.as_tensor(x))["y_features"].numpy()
    InvariantHeadRefit(_loader(train), "y", ["z"]).refit(network)
    with torch.no_grad():
        outputs = network(torch.as_tensor(x))

    assert (gaps(before) > 4).all()  # the shortcut column: 6 apart
    assert (gaps(outputs["y_features"].numpy()) < 1e-4).all()
    torch.testing.assert_close(outputs["y_output"], network.heads["y"](torch.as_tensor(x)))  # head already ignores the erased part
