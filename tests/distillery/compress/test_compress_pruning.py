"""Unstructured and channel pruning on the project's models, and pruned checkpoints that reload."""
import copy
import io

import numpy as np
import pytest
import torch

from distillery.compress import pruning
from distillery.models import build_model
from distillery.training import FitConfig, fit

X = torch.randn(2, 1, 8, 8)
SPECS = {
    "toy": {"arch": "toy", "in_channels": 1},
    "resnet18": {"arch": "resnet18", "width": 0.125, "in_channels": 1},
    "vgg16_bn": {"arch": "vgg16_bn", "width": 0.125, "depth": 1, "in_channels": 1, "image_size": 8},
    "wrn28_10": {"arch": "wrn28_10", "width": 1, "depth": 10, "in_channels": 1},
}


def _tiny_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.9])
def test_unstructured_reaches_sparsity_and_leaves_plain_weights(target):
    model = build_model(SPECS["resnet18"])
    pruned = pruning.prune_unstructured(model, target)
    assert abs(pruning.sparsity(pruned) - target) < 0.01
    assert pruning.sparsity(model) == 0.0  # the input model is untouched
    keys = pruned.state_dict().keys()
    assert not any(k.endswith(("weight_orig", "weight_mask")) for k in keys)
    assert set(keys) == set(model.state_dict().keys())
    assert pruning.count_nonzero(pruned) < pruning.count_params(pruned) == pruning.count_params(model)


def test_unstructured_is_global_not_per_layer():
    model = build_model(SPECS["toy"])
    with torch.no_grad():
        model.conv1.weight.mul_(100)  # the big layer should survive almost whole
    pruned = pruning.prune_unstructured(model, 0.5)
    assert (pruned.conv1.weight == 0).float().mean() < 0.05


def test_masks_hold_after_training_steps_only_with_the_hook():
    pruned = pruning.prune_unstructured(build_model(SPECS["toy"]), 0.6)
    masks = pruning.masks(pruned)
    assert set(masks) == {"conv1.weight", "conv2.weight", "fc.weight"}
    data, cfg = _tiny_data(), FitConfig(epochs=1, lr=0.05, batch_size=16)
    kept = copy.deepcopy(pruned)
    fit(kept, data, data, cfg, after_step=lambda m: pruning.apply_masks(m, masks))
    for name, p in kept.named_parameters():
        if name in masks:
            assert torch.all(p[~masks[name]] == 0)
    assert abs(pruning.sparsity(kept) - pruning.sparsity(pruned)) < 1e-3
    fit(pruned, data, data, cfg)  # without the hook, momentum and decay regrow the zeros
    assert pruning.sparsity(pruned) < 0.1


@pytest.mark.parametrize("arch", list(SPECS))
def test_structured_pruning_removes_channels(arch):
    model = build_model(SPECS[arch]).eval()
    pruned = pruning.prune_structured(model, 0.5, X)
    assert pruning.count_params(pruned) < 0.5 * pruning.count_params(model)
    assert pruning.count_macs(pruned, X) < 0.5 * pruning.count_macs(model, X)
    assert pruned(X).shape == model(X).shape == (2, 10)
    assert pruning.count_params(model) == pruning.count_params(build_model(SPECS[arch]))  # input untouched


def test_structured_pruning_can_keep_channel_counts_in_multiples_of_a_block():
    model = build_model({**SPECS["resnet18"], "width": 0.75}).eval()  # 48-96-192-384 channels
    convs = lambda m: [c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)]  # noqa: E731
    plain, blocked = pruning.prune_structured(model, 0.5, X), pruning.prune_structured(model, 0.5, X, round_to=16)
    assert any(c % 16 for c in convs(plain)), convs(plain)  # half of a width-scaled net is not a multiple of 16
    assert all(c % 16 == 0 for c in convs(blocked)), convs(blocked)
    assert blocked(X).shape == (2, 10)


def test_rounding_that_would_keep_every_layer_whole_falls_back_to_plain_pruning(capsys):
    model = build_model({"arch": "toy", "width": 0.5, "in_channels": 1}).eval()  # too narrow to keep 16s and prune
    assert pruning.count_params(pruning._remove_channels(model, 0.5, X, 16)) == pruning.count_params(model)
    pruned = pruning.prune_structured(model, 0.5, X, round_to=16)
    assert pruning.count_params(pruned) < 0.5 * pruning.count_params(model)
    assert "pruned without rounding" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["resnet18", "wrn28_10"])
def test_pruned_checkpoint_round_trips_with_weights_only(arch):
    pruned = pruning.prune_structured(build_model(SPECS[arch]).eval(), 0.5, X)
    buf = io.BytesIO()
    torch.save({"spec": SPECS[arch], "shapes": pruning.shapes_of(pruned), "state_dict": pruned.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    for source in (ckpt["shapes"], ckpt["state_dict"]):
        rebuilt = pruning.rebuild_pruned(build_model(ckpt["spec"]), source)
        rebuilt.load_state_dict(ckpt["state_dict"])
        torch.testing.assert_close(rebuilt.eval()(X), pruned(X))
        assert pruning.shapes_of(rebuilt) == pruning.shapes_of(pruned)


def test_rebuild_refuses_shapes_of_another_model():
    shapes = pruning.shapes_of(build_model(SPECS["resnet18"]))
    with pytest.raises(ValueError, match="lacks"):
        pruning.rebuild_pruned(build_model(SPECS["toy"]), shapes)


def test_counts_agree_with_torch_pruning_on_a_known_layer():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1, bias=False))
    assert pruning.count_params(model) == 36
    assert pruning.count_macs(model, X[:1]) == 4 * 9 * 64  # out channels x kernel x pixels
    np.testing.assert_equal(pruning.count_nonzero(pruning.prune_unstructured(model, 0.25)), 27)
