"""The digits as PPCL's MMDiT sees them (8x8 in [-1, 1]), the foundation classifier that scores
prompt adherence, the fixed prompt set and sample grids. Paths come from the caller."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from distillery.core.artifacts import atomic_path
from distillery.core.errors import ArtifactError
from distillery.core.plotting import pyplot
from distillery.data import load_split
from distillery.models import load_model
from distillery.ppcl.quality import prompt_noise, prompt_set, sample_grid


def meta(prepared: Path) -> dict:
    """The prepared data's meta.json (image size, channels, the train split's mean and std)."""
    path = Path(prepared) / "meta.json"
    if not path.exists():
        raise ArtifactError(f"{path}: missing; run the prepare stage first (dvc repro prepare)")
    return json.loads(path.read_text())


def to_unit(x: np.ndarray, m: dict) -> torch.Tensor:
    """Prepared (standardised) images back to [0, 1]."""
    mean = torch.tensor(m["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(m["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (torch.as_tensor(x, dtype=torch.float32) * std + mean).clamp(0, 1)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)


def diffusion_data(prepared: Path, image_size: int = 8, splits: tuple[str, ...] = ("train", "val")
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The prepared splits as the MMDiT trains on them: de-standardised, resized to `image_size`, in [-1, 1]."""
    m = meta(prepared)
    xs, ys = zip(*(load_split(Path(prepared), s) for s in splits))
    x = resize(to_unit(np.concatenate(xs), m), image_size)
    return x.clamp(0, 1) * 2 - 1, torch.as_tensor(np.concatenate(ys))


class Classifier(nn.Module):
    """The foundation classifier behind the preprocessing it was trained with: [-1, 1] -> [0, 1] ->
    prepare.image_size -> standardised with the train split's mean / std."""

    def __init__(self, model: nn.Module, m: dict):
        super().__init__()
        self.model = model.eval()
        self.size = int(m["image_size"])
        self.register_buffer("mean", torch.tensor(m["mean"], dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(m["std"], dtype=torch.float32).view(1, -1, 1, 1))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        x = resize((x.float().clamp(-1, 1) + 1) / 2, self.size)
        if x.shape[1] != self.mean.shape[1]:
            x = x.expand(-1, self.mean.shape[1], -1, -1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(x))


def load_classifier(path: Path, prepared: Path) -> Classifier:
    """The foundation digits classifier at `path`, behind the preprocessing of the data in `prepared`."""
    model, _ = load_model(path)
    return Classifier(model, meta(prepared))


def prompts(per_digit: int, seed: int, image_size: int = 8, channels: int = 1):
    """The fixed, seeded prompt set and its starting noise: (labels, tokens, noise)."""
    labels, tokens = prompt_set(per_digit, seed=seed)
    return labels, torch.as_tensor(tokens), prompt_noise(len(labels), (channels, image_size, image_size), seed=seed)


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10) -> None:
    """A sample grid (one column per digit when the prompts are grouped by digit) as a PNG."""
    plt = pyplot()
    grid = sample_grid(images, nrow=nrow)
    with atomic_path(path) as tmp:
        plt.imsave(tmp, grid, cmap="gray", vmin=0, vmax=1, format="png")


def grouped_by_digit(images: torch.Tensor, labels: np.ndarray, per_row: int = 10, rows: int = 10) -> torch.Tensor:
    """Up to `rows` samples of each digit laid out so that each grid row is one digit... transposed:
    row r holds the r-th sample of digits 0..9 (so each column is one prompt digit)."""
    out = []
    for r in range(rows):
        for d in range(per_row):
            idx = np.flatnonzero(labels == d)
            if r < len(idx):
                out.append(images[idx[r]])
    return torch.stack(out)
