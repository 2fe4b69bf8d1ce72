"""A user's own network, as it would sit in their project: its own class, a builder, no Distillery imports."""
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, num_classes: int = 10, pixels: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(pixels, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def build(num_classes: int = 10, pixels: int = 64) -> Net:
    return Net(num_classes, pixels)


def not_a_model() -> dict:
    return {"fc1": 1}


class Branchy(Net):
    """Python control flow on the data: runs, but torch.fx cannot trace it for QAT."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 2
        return super().forward(x)


def branchy(num_classes: int = 10, pixels: int = 64) -> Branchy:
    return Branchy(num_classes, pixels)
