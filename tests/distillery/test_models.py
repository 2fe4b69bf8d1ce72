import pytest
import torch

from distillery.models import MODELS, build_model


@pytest.mark.parametrize("spec", [
    {"arch": "resnet18", "width": 0.125, "depth": 1},
    {"arch": "vgg16_bn", "width": 0.125, "depth": 1, "image_size": 8},
    {"arch": "wrn28_10", "width": 1.0, "depth": 10},
    {"arch": "toy"},
])
def test_models_build_and_map_images_to_logits(spec):
    model = build_model({**spec, "in_channels": 1, "num_classes": 7}).eval()
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)


def test_real_sizes_match_the_papers_models():
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 11.0e6 < n(build_model({"arch": "resnet18", "num_classes": 10})) < 11.4e6  # ResNet-18: 11.2 M
    assert 36.0e6 < n(build_model({"arch": "wrn28_10", "num_classes": 10})) < 36.6e6  # WRN-28-10: 36.5 M
    assert 14.7e6 < n(build_model({"arch": "vgg16_bn", "num_classes": 10})) < 15.1e6  # VGG-16-BN (CIFAR): 14.7 M


def test_unknown_arch_names_the_choices():
    with pytest.raises(ValueError, match="resnet18"):
        build_model({"arch": "alexnet"})
    assert {"resnet18", "vgg16_bn", "wrn28_10"} <= set(MODELS)


def test_wrn_depth_must_be_6n_plus_4():
    with pytest.raises(ValueError, match="6n\\+4"):
        build_model({"arch": "wrn28_10", "depth": 27})
