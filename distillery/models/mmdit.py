"""A small text-to-image MMDiT (SD3 / FLUX / Qwen-Image style) for rectified-flow training on digits.

Every block is dual-stream: the image tokens and the text tokens each have their own adaLN
modulation (from the timestep + pooled-text vector), QKV and output projections and MLP, and the
two streams meet only in one JOINT attention over the concatenated [image; text] tokens.
`forward(x_t, t, tokens) -> velocity` is one denoising step; `embed` / `blocks` / `head` split it
so that compression code can run, cache and replace the block stack.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from distillery.models.registry import register


class ResidualLinear(nn.Module):
    """`y = x + W x + b`: identity at init, the drop-in linear replacement for a block or an MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled by 1000 as in DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class JointBlock(nn.Module):
    """`(img, txt, c) -> (img, txt)`: per-stream adaLN-Zero, joint attention, per-stream MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, linear_mlp_img: bool = False,
                 linear_mlp_txt: bool = False):
        super().__init__()
        self.heads = heads
        for s, linear in (("img", linear_mlp_img), ("txt", linear_mlp_txt)):
            mod = nn.Linear(dim, 6 * dim)
            nn.init.zeros_(mod.weight)  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(mod.bias)
            setattr(self, f"mod_{s}", mod)
            setattr(self, f"norm1_{s}", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"qkv_{s}", nn.Linear(dim, 3 * dim))
            setattr(self, f"proj_{s}", nn.Linear(dim, dim))
            setattr(self, f"norm2_{s}", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"mlp_{s}", ResidualLinear(dim) if linear else Mlp(dim, mlp_ratio))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = F.silu(c)
        mi = self.mod_img(c).chunk(6, dim=-1)
        mt = self.mod_txt(c).chunk(6, dim=-1)
        qkv_i = self.qkv_img(modulate(self.norm1_img(img), mi[0], mi[1])).chunk(3, dim=-1)
        qkv_t = self.qkv_txt(modulate(self.norm1_txt(txt), mt[0], mt[1])).chunk(3, dim=-1)
        q, k, v = (self._heads(torch.cat([a, b], dim=1)) for a, b in zip(qkv_i, qkv_t))
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        n_img = img.shape[1]
        img = img + mi[2][:, None] * self.proj_img(att[:, :n_img])
        txt = txt + mt[2][:, None] * self.proj_txt(att[:, n_img:])
        img = img + mi[5][:, None] * self.mlp_img(modulate(self.norm2_img(img), mi[3], mi[4]))
        txt = txt + mt[5][:, None] * self.mlp_txt(modulate(self.norm2_txt(txt), mt[3], mt[4]))
        return img, txt


class MMDiT(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, in_channels: int, image_size: int,
                 patch_size: int, vocab_size: int, text_len: int, linear_mlp_img=(), linear_mlp_txt=()):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by heads={heads}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.in_channels, self.image_size, self.patch_size = in_channels, image_size, patch_size
        self.n_patches = (image_size // patch_size) ** 2
        patch_dim = in_channels * patch_size ** 2
        self.img_in = nn.Linear(patch_dim, dim)
        self.img_pos = nn.Parameter(torch.randn(1, self.n_patches, dim) * 0.02)
        self.txt_emb = nn.Embedding(vocab_size, dim)
        self.txt_pos = nn.Parameter(torch.randn(1, text_len, dim) * 0.02)
        self.t_freq = 2 * max(16, dim // 2)
        self.t_mlp = nn.Sequential(nn.Linear(self.t_freq, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.pool_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(
            JointBlock(dim, heads, mlp_ratio, i in set(linear_mlp_img), i in set(linear_mlp_txt)) for i in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mod_out = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, patch_dim)
        for layer in (self.mod_out, self.out):  # zero head: the untrained model predicts velocity 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor):
        """Image patches, text tokens and the conditioning vector c (timestep + pooled caption)."""
        b, ch, p = x.shape[0], self.in_channels, self.patch_size
        g = self.image_size // p
        patches = x.reshape(b, ch, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, ch * p * p)
        img = self.img_in(patches) + self.img_pos
        words = self.txt_emb(tokens)
        txt = words + self.txt_pos
        mask = (tokens != 0).to(words.dtype).unsqueeze(-1)
        pooled = (words * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # all-pad (empty) caption pools to 0
        c = self.t_mlp(timestep_embedding(t, self.t_freq)) + self.pool_mlp(pooled)
        return (img, txt), c

    def head(self, states: tuple[torch.Tensor, ...], c: torch.Tensor) -> torch.Tensor:
        """The image stream's final hidden state to the velocity image (b, c, h, w)."""
        shift, scale = self.mod_out(F.silu(c)).chunk(2, dim=-1)
        out = self.out(modulate(self.norm_out(states[0]), shift, scale))
        b, ch, p = out.shape[0], self.in_channels, self.patch_size
        g = self.image_size // p
        return out.reshape(b, g, g, ch, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        (img, txt), c = self.embed(x, t, tokens)
        for block in self.blocks:
            img, txt = block(img, txt, c)
        return self.head((img, txt), c)

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, self.in_channels, self.image_size, self.image_size, generator=g)
        tokens = torch.randint(1, self.txt_emb.num_embeddings, (batch, self.txt_pos.shape[1]), generator=g)
        return x, torch.rand(batch, generator=g), tokens


@register("mmdit")
def mmdit(width: float = 1.0, depth: int = 12, in_channels: int = 1, image_size: int = 8, patch_size: int = 2,
          heads: int = 4, mlp_ratio: float = 4.0, vocab_size: int = 32, text_len: int = 6,
          linear_mlp_img: list[int] = (), linear_mlp_txt: list[int] = ()) -> MMDiT:
    """MMDiT with hidden size 64 * `width` and `depth` joint blocks; `linear_mlp_*` lists the blocks
    whose image / text MLP is a ResidualLinear (width-pruned), so a pruned checkpoint rebuilds exactly."""
    return MMDiT(max(heads, int(round(64 * width / heads)) * heads), depth, heads, mlp_ratio, in_channels,
                 image_size, patch_size, vocab_size, text_len, linear_mlp_img, linear_mlp_txt)
