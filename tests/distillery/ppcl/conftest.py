"""Tiny MMDiT and ViT (4 blocks, hidden 32) with random, non-identity blocks, and their inputs."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from distillery.models import build_model
from distillery.ppcl.text import caption_tokens

N_BLOCKS = 4


def randomize(model: nn.Module, std: float = 1.0) -> nn.Module:
    """adaLN-Zero and the zero head make a fresh MMDiT the identity; give every weight a value."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, std / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else std)
    return model.eval()


@pytest.fixture
def mmdit():
    return randomize(build_model({"arch": "mmdit", "width": 0.5, "depth": N_BLOCKS, "heads": 2}))


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return build_model({"arch": "vit", "width": 0.5, "depth": N_BLOCKS, "heads": 2}).eval()


def mmdit_inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    labels = np.arange(n) % 10
    return torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g), torch.as_tensor(caption_tokens(labels, seed))


def vit_inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    return (torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)),)


@pytest.fixture(params=["mmdit", "vit"])
def model_and_inputs(request):
    """Both adapters: (model, adapter, calibration inputs)."""
    from distillery.ppcl.adapter import MMDIT, VIT
    if request.param == "mmdit":
        return request.getfixturevalue("mmdit"), MMDIT, mmdit_inputs(64)
    return request.getfixturevalue("vit"), VIT, vit_inputs(64)
