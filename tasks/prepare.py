"""Stage `prepare`: load the raw data, resize, split with a seed, standardise, write the splits.

Writes `data/prepared/{train,val,test}.npz` (x float32 NCHW exactly as the models consume it,
y int64) and `meta.json` (classes, shape, normalisation), which later stages read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.artifacts import write_json, write_npz
from tasks.config import PrepareConfig, load_section
from tasks.errors import DataError, run_stage
from tasks.data import check_source, load_source, stratified_split

OUT = Path("data/prepared")


def resize(x: np.ndarray, size: int, grayscale: bool) -> np.ndarray:
    """Bilinear resize to size x size (antialiased when shrinking); optional RGB -> gray."""
    import torch
    import torch.nn.functional as F
    t = torch.from_numpy(x)
    if grayscale and t.shape[1] == 3:
        t = (t * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=t.shape[-1] > size)
    return t.numpy().astype(np.float32)


def prepare(cfg: PrepareConfig) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Raw data -> standardised train/val/test splits and their metadata."""
    x, y, classes = load_source(cfg.source, cfg.path)
    if y.max() >= len(classes):
        raise DataError(f"labels go up to {int(y.max())} but only {len(classes)} classes were found")
    x = resize(x, cfg.image_size, cfg.grayscale)
    idx = stratified_split(y, cfg.val_ratio, cfg.test_ratio, cfg.seed)
    mean = x[idx["train"]].mean(axis=(0, 2, 3))
    std = x[idx["train"]].std(axis=(0, 2, 3)) + 1e-6
    norm = ((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
    splits = {name: (norm[i], y[i].astype(np.int64)) for name, i in idx.items()}
    meta = {"classes": classes, "num_classes": len(classes), "in_channels": int(x.shape[1]),
            "image_size": cfg.image_size, "mean": mean.tolist(), "std": std.tolist(),
            "counts": {name: int(len(i)) for name, i in idx.items()}, "source": cfg.source}
    return splits, meta


def check(cfg: PrepareConfig) -> None:
    """Before a run: the raw data opens, is not empty, has image-shaped x and labels that fit; nothing is written."""
    check_source(cfg.source, cfg.path)


def main() -> None:
    from tasks import tracking
    cfg = load_section("prepare")
    with tracking.stage_run("prepare", cfg.model_dump()):
        splits, meta = prepare(cfg)
        for name, (x, y) in splits.items():
            write_npz(OUT / f"{name}.npz", x=x, y=y)
        write_json(OUT / "meta.json", meta)
        tracking.log_metrics({f"n_{k}": v for k, v in meta["counts"].items()})
        print(f"prepare: {meta['counts']} images of {meta['in_channels']}x{cfg.image_size}x{cfg.image_size}, "
              f"{meta['num_classes']} classes -> {OUT}")


if __name__ == "__main__":
    run_stage(main)
