"""CIFAR VGG-16-BN (Simonyan & Zisserman 2015): 13 conv-BN-ReLU layers, one linear classifier."""
import torch
import torch.nn as nn

from distillery.models.registry import register

STAGES = [64, 128, 256, 512, 512]  # VGG-16: 2, 2, 3, 3, 3 convs per stage


class VGG(nn.Module):
    def __init__(self, cfg: list, width: float, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        layers, cin, size = [], in_channels, image_size
        for v in cfg:
            if v == "M":
                if size >= 2:  # small inputs (8x8 digits) run out of resolution before VGG's five pools
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            cout = max(4, int(round(v * width)))
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register("vgg16_bn")
def vgg16_bn(width: float = 1.0, depth: int = 3, in_channels: int = 3, num_classes: int = 10,
             image_size: int = 32) -> VGG:
    """VGG-16-BN; `depth` (1-3) is the conv count of the three deep stages, 3 being the real VGG-16."""
    cfg = []
    for i, c in enumerate(STAGES):
        cfg += [c] * (2 if i < 2 else depth) + ["M"]
    return VGG(cfg, width, in_channels, num_classes, image_size)
