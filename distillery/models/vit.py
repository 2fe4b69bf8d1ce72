"""A small ViT classifier (pre-LN, cls token): the single-stream counterpart of the MMDiT."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from distillery.models.registry import register
from distillery.models.mmdit import Mlp, ResidualLinear


class Block(nn.Module):
    """`h -> h`: pre-LN self-attention and MLP, both residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, linear_mlp: bool = False):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ResidualLinear(dim) if linear_mlp else Mlp(dim, mlp_ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return h + self.mlp(self.norm2(h))


class ViT(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, in_channels: int, num_classes: int,
                 image_size: int, patch_size: int, linear_mlp=()):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.patch_size = patch_size
        n = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, i in set(linear_mlp)) for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(h[:, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


@register("vit")
def vit(width: float = 1.0, depth: int = 6, in_channels: int = 1, num_classes: int = 10, image_size: int = 8,
        patch_size: int = 2, heads: int = 4, mlp_ratio: float = 2.0, linear_mlp: list[int] = ()) -> ViT:
    """ViT with hidden size 64 * `width`, `depth` blocks, patches of `patch_size` pixels."""
    return ViT(max(heads, int(round(64 * width / heads)) * heads), depth, heads, mlp_ratio, in_channels,
               num_classes, image_size, patch_size, linear_mlp)
