"""Atomic writes and safe loads: no partial file is ever visible at an output path.

Every artifact is written to a temporary file beside its target and renamed into place, so a
killed process leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from distillery.core.errors import ArtifactError

@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path | str, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_npz(path: Path | str, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def save_checkpoint(path: Path | str, model: torch.nn.Module, spec: dict, **extra) -> None:
    """A checkpoint is {"spec": how to rebuild the model, "state_dict": weights, **extra}."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: torch would name the archive after the random temp name
        torch.save({"spec": spec, "state_dict": model.state_dict(), **extra}, f)


def load_artifact(path: Path | str, what: str, stage: str):
    """A stage's torch file (`weights_only=True`), with one clear error naming the stage that writes it."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: {what} missing; run the {stage} stage (dvc repro {stage})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ArtifactError(f"{path}: not a readable {what} file ({type(err).__name__}); re-run {stage}") from None


def load_checkpoint(path: Path | str) -> dict:
    """Load a checkpoint with `weights_only=True`: tensors and plain containers, never code."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: checkpoint missing; run the stage that writes it (dvc repro)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError... on bad files
        raise ArtifactError(f"{path}: not a readable checkpoint, truncated or corrupt ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200]}); restore it with `dvc checkout` or re-run its stage") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "spec" not in ckpt:
        raise ArtifactError(f"{path}: not a Distillery checkpoint (expected keys 'spec' and 'state_dict')")
    return ckpt
