"""AlexNet: the tutorial's layers, shapes and parameter count, and its state_dict import."""

import pytest
import torch
from torch import nn

from alexnet_lit.model import AlexNet, build_alexnet
from scripts.bench.tutorial_loop import tutorial_alexnet


def test_parameter_count_matches_the_tutorial():
    assert sum(p.numel() for p in AlexNet(num_classes=2).parameters()) == 46_755_202
    assert sum(p.numel() for p in tutorial_alexnet(3, 2).parameters()) == 46_755_202


def test_torchvision_arch_is_torchvisions_alexnet_for_any_channels():
    model = build_alexnet("torchvision", num_classes=2)
    assert sum(p.numel() for p in model.parameters()) == 57_012_034
    assert model(torch.rand(1, 3, 224, 224)).shape == (1, 2)
    gray = build_alexnet("torchvision", num_classes=2, in_channels=1)
    assert gray.features[0].weight.shape == (64, 1, 11, 11)
    assert gray(torch.rand(1, 1, 224, 224)).shape == (1, 2)
    with pytest.raises(ValueError, match=r"model\.arch must be one of tutorial, torchvision"):
        build_alexnet("resnet", num_classes=2)


@pytest.mark.parametrize("arch", ["tutorial", "torchvision"])
def test_hidden_features_sets_the_width_of_both_hidden_layers_and_nothing_else(arch):
    wide, narrow = build_alexnet(arch, 3), build_alexnet(arch, 3, hidden_features=64)
    wide_shapes = {key: tuple(t.shape) for key, t in wide.state_dict().items()}
    narrow_shapes = {key: tuple(t.shape) for key, t in narrow.state_dict().items()}
    changed = {key for key in wide_shapes if wide_shapes[key] != narrow_shapes[key]}
    linear = [i for i, layer in enumerate(narrow.classifier) if isinstance(layer, nn.Linear)]
    assert changed == {f"classifier.{i}.{p}" for i in linear for p in ("weight", "bias")} - {
        f"classifier.{linear[-1]}.bias"  # the head's bias: one per class either way
    }
    assert [narrow.classifier[i].out_features for i in linear] == [64, 64, 3]
    assert narrow(torch.rand(2, 3, 224, 224)).shape == (2, 3)
    with pytest.raises(ValueError, match="hidden_features must be at least 1, got 0"):
        build_alexnet(arch, 3, hidden_features=0)


def test_feature_map_shapes_layer_by_layer():
    # Index in `features` -> shape after it, from the tutorial's table.
    expected = {
        0: (96, 54, 54),
        2: (96, 26, 26),
        3: (256, 26, 26),
        5: (256, 12, 12),
        7: (384, 12, 12),
        9: (384, 12, 12),
        11: (256, 12, 12),
        13: (256, 5, 5),
    }
    model = AlexNet(num_classes=7)
    x = torch.randn(2, 3, 224, 224)
    for index, layer in enumerate(model.features):
        x = layer(x)
        if index in expected:
            assert tuple(x.shape[1:]) == expected[index], f"after features.{index}"
    assert len(model.features) == 14
    assert model(torch.randn(2, 3, 224, 224)).shape == (2, 7)


@pytest.mark.parametrize("size", [65, 128, 300])
def test_other_input_sizes_reach_the_classifier(size):
    model = AlexNet(num_classes=3, in_channels=1).eval()
    assert model(torch.randn(1, 1, size, size)).shape == (1, 3)


def test_every_parameter_gets_a_finite_gradient():
    model = AlexNet(num_classes=3)
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 224, 224)), torch.tensor([0, 2]))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_tutorial_state_dict_loads_with_identical_outputs():
    torch.manual_seed(0)
    seed = tutorial_alexnet(3, 2).eval()
    model = AlexNet(num_classes=2)
    model.load_tutorial_state_dict(seed.state_dict())
    model.eval()
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), seed(x))


def test_tutorial_state_dict_with_wrong_keys_names_them():
    state = tutorial_alexnet(3, 2).state_dict()
    state["99.weight"] = state.pop("21.weight")
    with pytest.raises(
        KeyError, match=r"missing keys \['21.weight'\].*unexpected keys \['99.weight'\]"
    ):
        AlexNet(num_classes=2).load_tutorial_state_dict(state)


def test_tutorial_state_dict_with_other_class_count_is_a_clear_error():
    state = tutorial_alexnet(3, 5).state_dict()
    with pytest.raises(ValueError, match=r"classifier.6.weight has shape \[5, 4096\].*num_classes"):
        AlexNet(num_classes=2).load_tutorial_state_dict(state)
