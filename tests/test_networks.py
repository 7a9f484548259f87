import numpy as np
import pytest
import torch

from mimm_med.networks import MIMMXNet, SmallCNN


@pytest.mark.parametrize(
    "backbone, spatial_dims, shape",
    [("small_cnn", 2, (2, 1, 28, 28)), ("resnet10", 3, (2, 1, 16, 16, 16)), ("densenet121", 2, (2, 1, 32, 32))],
)
def test_parts_and_heads_have_the_declared_shapes(backbone, spatial_dims, shape):
    net = MIMMXNet(backbone, {"age": 8, "sex": 4, "cohort": 6}, {"age": 3, "sex": 2, "cohort": 1}, spatial_dims=spatial_dims)
    out = net(torch.randn(*shape))
    assert out["features"].shape == (2, 18)
    assert [out[f"{n}_features"].shape[1] for n in ("age", "sex", "cohort")] == [8, 4, 6]
    assert out["age_output"].shape == (2, 3) and out["cohort_output"].shape == (2, 1)
    assert torch.equal(torch.cat([out["age_features"], out["sex_features"], out["cohort_features"]], 1), out["features"])
    assert net.primary == "age" and net.spurious == ["sex", "cohort"]


def test_a_head_sees_only_its_own_part():
    net = MIMMXNet("small_cnn", {"y": 4, "z": 4}, {"y": 2, "z": 2})
    x = torch.randn(3, 1, 28, 28)
    out = net(x)
    (grad,) = torch.autograd.grad(out["y_output"].sum(), out["features"])
    assert grad[:, 4:].abs().sum() == 0 and grad[:, :4].abs().sum() > 0


def test_module_backbone_and_torchscript_give_the_same_outputs():
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    net = MIMMXNet(backbone, {"y": 3, "z": 2}, {"y": 2, "z": 2}, backbone_dim=10).eval()
    x = torch.randn(2, 1, 8, 8)
    scripted = torch.jit.script(net)
    assert torch.allclose(scripted(x)["z_output"], net(x)["z_output"])


def test_bad_configuration_is_explained():
    with pytest.raises(ValueError, match="same factors"):
        MIMMXNet("small_cnn", {"y": 4, "z": 4}, {"y": 2})
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        MIMMXNet("vgg", {"y": 4}, {"y": 2})
    with pytest.raises(ValueError, match="backbone_dim"):
        MIMMXNet(torch.nn.Identity(), {"y": 4}, {"y": 2})
    with pytest.raises(ValueError, match="positive feature size"):
        MIMMXNet("small_cnn", {"y": 0}, {"y": 2})
    net = MIMMXNet("small_cnn", {"y": 4}, {"y": 2}, in_channels=1)
    with pytest.raises(RuntimeError, match="channels"):
        net(torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_instance_norm_small_cnn_computes_the_same_in_training_and_evaluation(spatial_dims):
    torch.manual_seed(0)
    network = SmallCNN(spatial_dims=spatial_dims, channels=(4, 8), norm="instance")
    batch = torch.rand((3, 1) + (12,) * spatial_dims)
    network.train()
    training = network(batch)
    network.eval()
    torch.testing.assert_close(network(batch), training)
    # Batch norm, the default, does not: its evaluation uses running statistics.
    batch_norm = SmallCNN(spatial_dims=spatial_dims, channels=(4, 8))
    assert not torch.allclose(batch_norm.train()(batch), batch_norm.eval()(batch))


def test_default_small_cnn_features_see_most_of_a_digit():
    """The last block's centre feature depends on a 17-pixel window, not the 9 of three blocks."""
    network = SmallCNN(spatial_dims=2, in_channels=1).eval()
    image = torch.zeros(1, 1, 28, 28, requires_grad=True)
    last_block = network.blocks(image)
    last_block[0, :, last_block.shape[2] // 2, last_block.shape[3] // 2].sum().backward()
    rows = torch.nonzero(image.grad[0, 0].abs().sum(dim=1)).flatten()
    assert rows.max() - rows.min() + 1 == 17


@pytest.mark.parametrize(
    "parts, num_classes, message",
    [
        ({"y": 2.5}, {"y": 2}, r"positive feature size \(an integer\), got 2.5"),  # was silently cut to 2
        ({"y": "4"}, {"y": 2}, r"positive feature size \(an integer\), got '4'"),
        ({"y": 4}, {"y": 2.7}, r"num_classes\['y'\] must be an integer"),
        ({1: 4}, {1: 2}, "part names must be non-empty strings"),  # was ModuleDict's TypeError
        ({"age.group": 4}, {"age.group": 2}, "without '.'"),  # was ModuleDict's KeyError
        ({"y": 4, "type": 4}, {"y": 2, "type": 2}, "part name 'type' is taken by torch's ModuleDict"),  # was a KeyError
    ],
)
def test_non_integer_sizes_and_unusable_names_are_refused(parts, num_classes, message):
    with pytest.raises(ValueError, match=message):
        MIMMXNet("small_cnn", parts, num_classes)


def test_integral_sizes_of_any_number_type_are_accepted():
    parts, num_classes = {"y": 4.0, "z": np.int64(2)}, {"y": np.int64(2), "z": 1}
    net = MIMMXNet("small_cnn", parts, num_classes, backbone_kwargs={"channels": (4,)})
    assert net.part_sizes == [4, 2] and net.num_classes == {"y": 2, "z": 1}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spatial_dims": 4}, "spatial_dims must be 2 or 3"),  # was an IndexError inside MONAI
        ({"in_channels": 0}, "in_channels must be at least 1"),
        ({"head_hidden": -1}, "head_hidden must be a whole number ≥ 0"),
    ],
)
def test_bad_named_backbone_settings_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MIMMXNet("small_cnn", {"y": 4}, {"y": 2}, **kwargs)


def test_inputs_and_backbones_of_the_wrong_shape_are_explained():
    net = MIMMXNet("small_cnn", {"y": 4}, {"y": 2}, backbone_kwargs={"channels": (4,)})
    # A batch without its channel axis used to reach conv2d as one image with B channels.
    with pytest.raises(ValueError, match=r"\(B, C, \*spatial\) with 2 spatial dims, got shape \[2, 12, 12\]"):
        net(torch.randn(2, 12, 12))
    module = MIMMXNet(torch.nn.Flatten(), {"y": 4}, {"y": 2}, backbone_dim=10)
    with pytest.raises(ValueError, match=r"backbone returned shape \[2, 16\], expected \(B, 10\)"):
        module(torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="backbone_dim must be the positive width"):
        MIMMXNet(torch.nn.Flatten(), {"y": 4}, {"y": 2}, backbone_dim=0)
