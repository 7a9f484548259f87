import re
import warnings

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.utils import set_determinism

from mimm_med.engines import METHODS, InvariantHeadRefit, MIMMXObjective, MIMMXTrainer, RecomputeBatchNorm, TrainingDiverged
from mimm_med.engines import trainer as trainer_module
from mimm_med.engines.trainer import _clipping_scale
from mimm_med.networks import MIMMXNet

PARTS = {"y": 8, "a": 4, "b": 4}


def _records(n: int = 48, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = np.where(rng.random(n) < 0.9, y, 1 - y)
    b = rng.integers(0, 2, n)
    images = rng.normal(size=(n, 1, 12, 12)).astype(np.float32) + y[:, None, None, None] * 0.5
    return [{"image": images[i], "y": int(y[i]), "a": int(a[i]), "b": int(b[i])} for i in range(n)]


def _build(method: str = "mimmx", epochs: int = 1, records=None, device: str = "cpu", amp: bool = False, **objective_kwargs):
    net = MIMMXNet("small_cnn", PARTS, {k: 2 for k in PARTS}, backbone_kwargs={"channels": (4, 8)}).to(device)
    objective = MIMMXObjective.for_network(method, net, **objective_kwargs)
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    critic_params = objective.critic_parameters()
    critic_optimizer = torch.optim.Adam(critic_params, 1e-2) if critic_params else None
    gradnorm_optimizer = torch.optim.Adam(objective.gradnorm.parameters(), 0.025) if objective.gradnorm else None
    loader = DataLoader(Dataset(records or _records()), batch_size=16, shuffle=True)
    return MIMMXTrainer(
        device, epochs, loader, net, optimizer, objective, critic_optimizer, gradnorm_optimizer, n_critic=2, amp=amp
    )


def _snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_reports_its_terms(method):
    set_determinism(0)
    trainer = _build(method)
    before = _snapshot(trainer.network)
    trainer.run()
    output = trainer.state.output
    assert np.isfinite(output["loss"])
    assert not _same(before, _snapshot(trainer.network))
    has_terms = any(key.startswith("dependence/") for key in output)
    assert has_terms == (trainer.objective.spec.penalty is not None)
    if method.startswith("mimmx"):
        assert {"weight/a", "weight/b", "task_weight/y", "mi_scale"} <= set(output)
        assert 0.0 < output["mi_scale"] <= 1.0
        assert sum(output[f"weight/{k}"] for k in "ab") == pytest.approx(1.0)


def test_float64_images_that_train_also_pass_the_batch_norm_recomputation_and_the_head_refit():
    """The trainer casts NumPy's float64 images; its handlers stopped on them (double input, float bias)."""
    set_determinism(0)
    trainer = _build("erm", records=[{**r, "image": r["image"].astype(np.float64)} for r in _records()])
    RecomputeBatchNorm(trainer.data_loader).attach(trainer)
    InvariantHeadRefit(trainer.data_loader, "y", ["b"]).attach(trainer)
    trained_head = trainer.network.heads["y"].weight.detach().clone()
    trainer.run()
    norms = [m for m in trainer.network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(bool(torch.isfinite(m.running_mean).all()) for m in norms)
    assert not torch.equal(trainer.network.heads["y"].weight, trained_head)


def test_closed_form_estimator_trains_without_a_critic_and_its_term_reaches_f_y():
    set_determinism(0)
    trainer = _build("mimmx", estimator="gaussian", reference="labels", conditional=True, balanced=True)
    assert trainer.critic_optimizer is None and trainer.objective.critic_parameters() == []
    trainer.run()
    output = trainer.state.output
    assert np.isnan(output["critic_loss"]) and np.isfinite(output["dependence/a"])
    records = _records()[:16]
    outputs = trainer.network(torch.as_tensor(np.stack([r["image"] for r in records])).float())
    labels = {k: torch.as_tensor([r[k] for r in records]) for k in PARTS}
    term = trainer.objective.dependence_terms(outputs, labels)["a"]
    (grad,) = torch.autograd.grad(term, outputs["y_features"])
    assert grad.abs().sum() > 0


def test_critics_learn_in_the_critic_phase_and_encoder_in_the_encoder_phase():
    set_determinism(0)
    trainer = _build("mimmx")
    trainer.state.max_epochs = 1
    trainer.state.epoch_length = 1
    net, critics = trainer.network, trainer.objective.terms
    initial_net, initial_critics = _snapshot(net), _snapshot(critics)
    calls: list[tuple[str, list, list]] = []

    def recording(optimizer, phase):
        step = optimizer.step

        def wrapped(*args, **kwargs):
            result = step(*args, **kwargs)
            calls.append((phase, _snapshot(net), _snapshot(critics)))
            return result

        optimizer.step = wrapped

    recording(trainer.critic_optimizer, "critic")
    recording(trainer.optimizer, "encoder")
    trainer.run()
    assert [phase for phase, _, _ in calls] == ["critic", "critic", "encoder"]
    # critic steps leave the network alone and change the critics
    assert _same(calls[1][1], initial_net) and not _same(calls[0][2], initial_critics)
    # the encoder step changes the network and leaves the critics as the critic phase left them
    assert not _same(calls[2][1], initial_net) and _same(calls[2][2], calls[1][2])


def test_mi_weight_multiplies_the_clipped_mi_gradient():
    # α clips the MI gradient to the task gradient's norm; λ applied after the clip lets a larger λ
    # push harder. Folded into the clipped term, λ would cancel out whenever the clip is active.
    after = {}
    for mi_weight in (2.0, 8.0):
        set_determinism(0)
        trainer = _build("mimmx", mi_weight=mi_weight)
        trainer.state.max_epochs = 1
        trainer.state.epoch_length = 1
        trainer.run()
        assert trainer.state.output["mi_scale"] < 1.0  # the clip was active
        after[mi_weight] = _snapshot(trainer.network.shared_layer)
    assert not _same(after[2.0], after[8.0])


def test_fixed_seed_reproduces_a_run_on_cpu():
    histories = []
    for _ in range(2):
        set_determinism(7)
        trainer = _build("mimmx", epochs=2)
        losses = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"]))
        trainer.run()
        histories.append((losses, _snapshot(trainer.network)))
    assert histories[0][0] == histories[1][0]
    assert _same(histories[0][1], histories[1][1])


def test_checkpoint_round_trip_restores_outputs_and_weighting_state(tmp_path):
    set_determinism(1)
    trainer = _build("mimmx", epochs=2)
    CheckpointSaver(str(tmp_path), trainer.checkpoint_items(), save_final=True, final_filename="last.pt").attach(trainer)
    trainer.run()
    set_determinism(2)
    resumed = _build("mimmx", epochs=2)
    CheckpointLoader(str(tmp_path / "last.pt"), resumed.checkpoint_items()).attach(resumed)
    resumed.run()  # loads at start; the run is already complete, so nothing more trains
    x = torch.randn(4, 1, 12, 12)
    trainer.network.eval(), resumed.network.eval()
    with torch.no_grad():
        assert torch.equal(trainer.network(x)["y_output"], resumed.network(x)["y_output"])
    for key, value in trainer.objective.state_dict().items():
        assert torch.equal(value, resumed.objective.state_dict()[key]), key
    assert resumed.state.epoch == 2 and resumed.state.iteration == trainer.state.iteration


def test_amp_request_on_cpu_is_off_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = MIMMXNet("small_cnn", PARTS, {k: 2 for k in PARTS}, backbone_kwargs={"channels": (4, 8)})
        objective = MIMMXObjective.for_network("erm", net)
        loader = DataLoader(Dataset(_records()), batch_size=16)
        trainer = MIMMXTrainer("cpu", 1, loader, net, torch.optim.SGD(net.parameters(), 0.1), objective, amp=True)
        trainer.run()
    assert trainer.amp is False and trainer.scaler is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_on_cuda_trains_in_half_precision_with_float32_critics_and_resumes_the_scaler(tmp_path):
    set_determinism(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = _build("mimmx", epochs=2, device="cuda", amp=True)
        half_precision_outputs = []
        trainer.network.backbone.register_forward_hook(lambda m, i, out: half_precision_outputs.append(out.dtype))
        before = _snapshot(trainer.network)
        CheckpointSaver(str(tmp_path), trainer.checkpoint_items(), save_final=True, final_filename="last.pt").attach(trainer)
        scaler = trainer.scaler
        trainer.run()
    assert trainer.amp is True and trainer.scaler is scaler and trainer.scaler.get_scale() > 0
    assert set(half_precision_outputs) == {torch.float16}
    assert all(p.dtype == torch.float32 for p in trainer.objective.parameters())
    assert not _same(before, _snapshot(trainer.network))
    assert all(np.isfinite(value) for value in trainer.state.output.values())
    resumed = _build("mimmx", epochs=2, device="cuda", amp=True)
    assert "scaler" in resumed.checkpoint_items()
    CheckpointLoader(str(tmp_path / "last.pt"), resumed.checkpoint_items()).attach(resumed)
    resumed.run()
    assert resumed.scaler.state_dict() == trainer.scaler.state_dict()


def test_nan_images_are_named_as_bad_data_not_as_divergence():
    records = _records()
    records[3]["image"][:] = np.nan
    set_determinism(0)
    trainer = _build("erm", records=records)
    with pytest.raises(ValueError, match=r"images of the batch at iteration \d+ hold NaN"):
        trainer.run()


@pytest.mark.parametrize("method", ["erm", "mimm", "mimmx"])
def test_a_diverging_network_stops_training_naming_iteration_and_term(method):
    set_determinism(0)
    trainer = _build(method, epochs=3)
    trainer.optimizer = torch.optim.SGD(trainer.network.parameters(), lr=1e30)
    # before: MIMM's critics met the NaN features first and raised the estimator's shape check
    with pytest.raises(TrainingDiverged, match=r"epoch 1, iteration 2: network output 'features' holds NaN"):
        trainer.run()


@pytest.mark.parametrize("method", ["mimm", "mimmx", "adversarial"])
def test_a_diverging_critic_is_named_with_its_own_fix(method):
    set_determinism(0)
    trainer = _build(method)
    trainer.critic_optimizer = torch.optim.SGD(trainer.objective.critic_parameters(), lr=1e30)
    # before: the next dependence term read NaN and the message told to lower the encoder's learning rate
    with pytest.raises(TrainingDiverged, match=r"iteration 1: critic loss = nan\. Lower critic_lr, or raise the batch size\."):
        trainer.run()


@pytest.mark.parametrize("label, shown", [(2, r"\[2.0\]"), (-1, r"\[-1.0\]"), (0.5, r"\[0.5\]")])
def test_a_label_that_is_not_a_class_index_is_named(label, shown):
    records = _records()
    records[5]["a"] = label
    with pytest.raises(ValueError, match=rf"label 'a' of a 2-class head must be a class index 0..1, but this batch has {shown}"):
        _build("mimmx", records=records).run()


def test_a_one_hot_label_is_named_with_its_shape():
    records = _records()
    for record in records:
        record["a"] = np.eye(2, dtype=np.int64)[record["a"]]  # one-hot rows: a batch of 16 gives (16, 2)
    with pytest.raises(ValueError, match=r"label 'a' has shape \(16, 2\), expected \(16,\): one class index"):
        _build("mimmx", records=records).run()


@pytest.mark.parametrize(
    "part_sizes, num_classes, options, message",
    [
        ({}, {}, {}, r"part_sizes must name at least the primary task"),  # was an IndexError
        ({"y": 4, "z": 4}, {"y": 2}, {}, r"num_classes lacks \['z'\]"),  # was a KeyError
        ({"y": 4, "z": 4}, {"y": 0, "z": 2}, {}, r"num_classes must be whole numbers >= 2 .* got \{'y': 0\}"),  # was regression
        ({"y": 4, "z": 4}, {"y": 1, "z": 2}, {"conditional": True}, r"conditional=True .* \['y'\] are regression targets"),
        ({"y": 4, "z": 4}, {"y": 2, "z": 1}, {"balanced": True}, r"balanced=True .* \['z'\] are regression targets"),
        ({"y": 4, "z": 4}, {"y": 2, "z": 1}, {"reference": "labels"}, r"reference='labels' .* regression targets"),
        ({"y": 4, "z": 4, "w": 4}, {"y": 2, "z": 2, "w": 2}, {"reference": "labels", "factor_pairs": True}, r"two factors' labels"),
    ],
)
def test_an_objective_whose_labels_cannot_serve_its_options_is_refused(part_sizes, num_classes, options, message):
    with pytest.raises(ValueError, match=message):
        MIMMXObjective("mimmx", part_sizes, num_classes, **options)


def test_a_rebalancing_method_without_a_rebalancing_loader_is_warned_of():
    with pytest.warns(UserWarning, match=r"'mimmx\+rebalance' rebalances through the training loader's sampler, but .* RandomSampler"):
        _build("mimmx+rebalance")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _build("mimmx")  # nothing to rebalance, nothing to warn of


@pytest.mark.parametrize(
    "processes, counts, fix",
    [
        (1, "3 training samples, batch_size 16 per process", "or train on more subjects"),
        # under DDP the loader holds one rank's share, not the manifest the user counted
        (2, "3 training samples of this process's share of the training set, over 2 processes, batch_size 16 per process",
         "or launch fewer processes (torchrun --nproc_per_node)"),
    ],
)  # fmt: skip
def test_a_training_set_smaller_than_one_batch_is_refused(processes, counts, fix, monkeypatch):
    trainer = _build("erm")
    trainer.data_loader = DataLoader(Dataset(_records(n=3)), batch_size=16, drop_last=True)
    monkeypatch.setattr(trainer_module, "world_size", lambda: processes)
    with pytest.raises(ValueError, match=re.escape(f"yields no batch ({counts}, drop_last)")) as refused:
        trainer.run()
    assert fix in str(refused.value)


def test_spurious_factors_and_critic_steps_are_checked():
    net = MIMMXNet("small_cnn", PARTS, {k: 2 for k in PARTS}, backbone_kwargs={"channels": (4, 8)})
    with pytest.raises(ValueError, match=r"got the string 'ab'; pass \['ab'\]"):
        MIMMXObjective.for_network("mimmx", net, spurious="ab")
    with pytest.raises(ValueError, match=r"\['a'\] are given more than once"):
        MIMMXObjective.for_network("mimmx", net, spurious=["a", "a"])
    objective = MIMMXObjective.for_network("mimm", net)
    critic_optimizer = torch.optim.Adam(objective.critic_parameters())
    with pytest.raises(ValueError, match=r"n_critic must be a whole number"):
        MIMMXTrainer("cpu", 1, [], net, torch.optim.SGD(net.parameters(), 0.1), objective, critic_optimizer, n_critic=1.5)
    # before: accepted, and the MI term was the estimate of a critic that never trained
    with pytest.raises(ValueError, match=r"method 'mimm' trains critics .* n_critic 0 would leave them untrained"):
        MIMMXTrainer("cpu", 1, [], net, torch.optim.SGD(net.parameters(), 0.1), objective, critic_optimizer, n_critic=0)
    erm = MIMMXObjective.for_network("erm", net)  # nothing to train in critic steps: 0 is fine
    MIMMXTrainer("cpu", 1, [], net, torch.optim.SGD(net.parameters(), 0.1), erm, n_critic=0)


def test_missing_labels_and_optimizers_are_explained():
    records = [{k: v for k, v in r.items() if k != "b"} for r in _records()]
    with pytest.raises(KeyError, match=r"batch lacks \['b'\]"):
        _build("mimmx", records=records).run()
    net = MIMMXNet("small_cnn", PARTS, {k: 2 for k in PARTS}, backbone_kwargs={"channels": (4, 8)})
    objective = MIMMXObjective.for_network("mimm", net)
    with pytest.raises(ValueError, match="critic_optimizer"):
        MIMMXTrainer("cpu", 1, [], net, torch.optim.SGD(net.parameters(), 0.1), objective)
    with pytest.raises(ValueError, match="unknown method 'mimmy'"):
        MIMMXObjective.for_network("mimmy", net)


@pytest.mark.parametrize("mi_weight", [float("nan"), float("inf"), -0.5])
def test_an_mi_weight_that_is_not_finite_and_non_negative_is_refused(mi_weight):
    net = MIMMXNet("small_cnn", PARTS, {k: 2 for k in PARTS}, backbone_kwargs={"channels": (4, 8)})
    with pytest.raises(ValueError, match=r"mi_weight must be a finite number >= 0"):
        MIMMXObjective.for_network("mimmx", net, mi_weight=mi_weight)
    assert MIMMXObjective.for_network("mimmx", net, mi_weight=0.0).mi_weight == 0.0


@pytest.mark.parametrize("epochs", [0, -1])
def test_fewer_than_one_epoch_is_refused_by_name(epochs):
    with pytest.raises(ValueError, match=r"max_epochs \(the bundles' and benchmarks' epochs\) must be a whole number >= 1"):
        _build("erm", epochs=epochs)


def test_label_reference_pairs_f_y_with_the_factor_labels_not_the_factor_features():
    torch.manual_seed(0)
    net = MIMMXNet("small_cnn", PARTS, {k: 2 for k in PARTS}, backbone_kwargs={"channels": (4, 8)})
    objective = MIMMXObjective.for_network("mimmx", net, reference="labels")
    batch = _records(32)
    image = torch.tensor(np.stack([r["image"] for r in batch])).float()
    labels = {k: torch.tensor([r[k] for r in batch]) for k in PARTS}
    outputs = net(image)
    terms = objective.dependence_terms(outputs, labels)
    assert [est.dim_b for est in objective.terms.estimators.values()] == [2, 2]  # one-hot labels
    other_features = {**outputs, "a_features": torch.randn_like(outputs["a_features"])}
    assert torch.equal(objective.dependence_terms(other_features, labels)["a"], terms["a"])
    flipped = {**labels, "a": 1 - labels["a"]}
    assert not torch.equal(objective.dependence_terms(outputs, flipped)["a"], terms["a"])
    (grad,) = torch.autograd.grad(terms["a"], outputs["y_features"])
    assert grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reference must be"):
        MIMMXObjective.for_network("mimmx", net, reference="logits")


def _noise_records(n: int = 96) -> list[dict]:
    """Images of pure noise and independent labels: whatever the critic reads, the features hold no factor."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, 1, 12, 12)).astype(np.float32)
    return [{"image": images[i], **{k: int(rng.integers(0, 2)) for k in PARTS}} for i in range(n)]


def test_an_mi_estimate_that_stays_negative_is_named_with_the_settings_to_change(caplog):
    set_determinism(0)
    trainer = _build("mimm", epochs=3, records=_noise_records())  # critic lr 1e-2 at batch 16: too high
    with caplog.at_level("WARNING", logger="mimm_med.engines.trainer"):
        trainer.run()
    warnings_ = [record.getMessage() for record in caplog.records if "never negative" in record.getMessage()]
    assert len(warnings_) == 2, warnings_  # one per term, not one per epoch
    assert "dependence/a averaged -" in warnings_[0] and "critic_lr, now 0.01" in warnings_[0]


def test_an_mi_estimate_near_zero_raises_no_warning(caplog):
    set_determinism(0)
    trainer = _build("mimm", epochs=3, records=_noise_records())
    for group in trainer.critic_optimizer.param_groups:
        group["lr"] = 1e-3
    with caplog.at_level("WARNING", logger="mimm_med.engines.trainer"):
        trainer.run()
    assert not [record for record in caplog.records if "never negative" in record.getMessage()]


def test_the_clipping_scale_under_amp_is_taken_from_the_scaled_losses_so_a_small_task_gradient_does_not_vanish():
    # A task gradient of 1e-8 per float16 activation underflows to zero, which would make α = 0 and
    # switch the MI penalty off; the GradScaler's factor keeps it, and α is the float32 one.
    torch.manual_seed(0)
    weight, x = torch.nn.Parameter(torch.randn(8, 8)), torch.randn(16, 8)

    def scale(cast, loss_scale):
        activations = cast(x @ weight)
        return _clipping_scale(1e-8 * activations.float().sum(), activations.float().pow(2).mean(), [weight], loss_scale)

    exact = scale(lambda t: t, 1.0)
    assert exact > 0
    assert scale(torch.Tensor.half, 1.0) == 0.0  # the underflow itself
    assert scale(torch.Tensor.half, 2.0**16).item() == pytest.approx(exact.item(), rel=0.01)


def test_steps_that_overflow_at_the_amp_loss_scale_are_skipped_and_leave_gradnorm_as_it_was():
    # A loss scale far too high (as AMP's first steps may hold) overflows every gradient: the GradScaler
    # skips the network's steps and lowers its scale, and GradNorm skips its update with them.
    set_determinism(0)
    trainer = _build("mimmx")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=3e38)
    network, task_weights = _snapshot(trainer.network), _snapshot(trainer.objective.gradnorm)
    trainer.run()
    assert _same(network, _snapshot(trainer.network))
    assert _same(task_weights, _snapshot(trainer.objective.gradnorm))
    assert trainer.scaler.get_scale() < 3e38
