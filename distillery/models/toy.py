"""A three-layer conv net for unit tests: builds and runs in milliseconds."""
import torch
import torch.nn as nn

from distillery.models.registry import register


class Toy(nn.Module):
    def __init__(self, width: float, in_channels: int, num_classes: int):
        super().__init__()
        c = max(4, int(round(16 * width)))
        self.conv1 = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * c)
        self.fc = nn.Linear(2 * c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@register("toy")
def toy(width: float = 1.0, depth: int = 1, in_channels: int = 1, num_classes: int = 10) -> Toy:
    """Tiny model for tests; `depth` is accepted for a uniform spec and ignored."""
    return Toy(width, in_channels, num_classes)
