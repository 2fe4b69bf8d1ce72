"""What the PQD stages share: where their checkpoints live and how a stage's data is loaded."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

PREPARED = Path("data/prepared")
TEACHER = Path("models/teacher.pt")
PRUNED = Path("models/pqd/pruned.pt")
QUANTIZED = Path("models/pqd/quantized.pt")
DISTILLED = Path("models/pqd/distilled.pt")


def load_data() -> tuple[dict, tuple, tuple, tuple]:
    """(meta, train, val, test) from the prepared splits."""
    from tasks.data import load_split
    meta = json.loads((PREPARED / "meta.json").read_text())
    return (meta, *(load_split(PREPARED, s) for s in ("train", "val", "test")))


def input_shape(meta: dict) -> list[int]:
    return [1, meta["in_channels"], meta["image_size"], meta["image_size"]]


def model_stats(model: torch.nn.Module, meta: dict) -> dict[str, int]:
    """Parameters, non-zero parameters and MACs of a torch model at batch 1."""
    from tasks.compress.pruning import count_macs, count_nonzero, count_params
    return {"params": count_params(model), "nonzero_params": count_nonzero(model),
            "macs": count_macs(model, torch.zeros(input_shape(meta)))}


def calibration_subset(x: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, str]:
    """A seeded subset of train for calibration, and its sha256 so the record says exactly which."""
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=min(size, len(x)), replace=False))
    subset = np.ascontiguousarray(x[idx])
    return subset, hashlib.sha256(subset.tobytes()).hexdigest()
