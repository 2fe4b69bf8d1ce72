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
