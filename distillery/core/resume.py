"""Resume state for training stages: saved atomically after every epoch, found again after a crash.

The file name carries a hash of the stage's config and inputs, so a state left by a run with
other params or data is never picked up.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from distillery.core import tracking
from distillery.core.artifacts import atomic_path

RESUME_DIR = Path(".distillery/resume")


def resume_file(stage: str, cfg: dict, data_key: str) -> Path:
    """Where a stage keeps its epoch state; the name changes whenever its config or data do."""
    key = hashlib.sha256((json.dumps(cfg, sort_keys=True) + data_key).encode()).hexdigest()[:16]
    return RESUME_DIR / f"{stage}-{key}.pt"


def epoch_saver(path: Path, then: Callable[[int, torch.nn.Module], None] | None = None):
    """An `on_epoch` callback: persist the resume state atomically, log the epoch, then call `then`."""
    def save(epoch: int, model, state: dict, hist) -> None:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        row = hist.epochs[-1]
        tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        if then is not None:
            then(epoch, model)
    return save


def load_resume(path: Path, enabled: bool) -> dict | None:
    if not enabled or not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a state file cut short by a crash before its rename cannot exist; anything else: start over
        return None
    print(f"resuming from {path} after epoch {len(state['history']) - 1}")
    return state
