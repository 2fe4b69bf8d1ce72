"""Checkpoints of compressed models: rebuilt from the teacher's spec plus what compression changed.

A checkpoint is loaded with `weights_only=True` (no pickled modules), so it says how to rebuild
the model: `shapes` (channels left by structured pruning) and `qat` + `input_shape` + `masks` (a
fake-quantized model, rebuilt by the same deterministic `prepare_qat`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from distillery.compress.pruning import rebuild_pruned
from distillery.compress.qat import prepare_qat
from distillery.core.artifacts import load_checkpoint
from distillery.models import build_model, load_weights


def load_compressed(path: Path | str) -> tuple[torch.nn.Module, dict]:
    """Rebuild any Distillery checkpoint, compressed or not; returns (model in eval mode, checkpoint)."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt["spec"])
    if ckpt.get("shapes"):
        rebuild_pruned(model, ckpt["shapes"])
    if ckpt.get("qat"):
        model = prepare_qat(model, torch.zeros(ckpt["input_shape"]), ckpt.get("masks"))
    return load_weights(model, ckpt, path), ckpt
