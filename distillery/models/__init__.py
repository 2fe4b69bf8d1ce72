"""Model zoo: CIFAR-style classifiers written here (no torchvision), built by name from a small spec.

`build_model(spec)` is the one entry point; `spec` is a plain dict so it can live inside a
checkpoint loaded with `weights_only=True` and rebuild the exact architecture later.
"""
from pathlib import Path

import torch.nn as nn

from distillery.core.artifacts import load_checkpoint
from distillery.core.errors import ArtifactError, ParamsError
from distillery.models import mmdit, resnet, toy, vgg, vit, wrn  # noqa: F401  (each registers its models)
from distillery.models.registry import MODELS


def build_model(spec: dict) -> nn.Module:
    """Build a model from {"arch", "width", "depth", "in_channels", "num_classes", ...}."""
    spec = dict(spec)
    arch = spec.pop("arch")
    if arch not in MODELS:
        raise ParamsError(f"unknown model arch {arch!r}; available: {', '.join(sorted(MODELS))}")
    return MODELS[arch](**spec)


def load_model(path: Path | str) -> tuple[nn.Module, dict]:
    """Rebuild an uncompressed model (a teacher) from its checkpoint; returns (model in eval mode, checkpoint).

    Pruned or quantized checkpoints need `distillery.compress.checkpoint.load_compressed`.
    """
    ckpt = load_checkpoint(path)
    if ckpt.get("shapes") or ckpt.get("qat"):
        raise ArtifactError(f"{path}: a compressed checkpoint; load it with distillery.compress.checkpoint.load_compressed")
    return load_weights(build_model(ckpt["spec"]), ckpt, path), ckpt


def load_weights(model: nn.Module, ckpt: dict, path: Path | str) -> nn.Module:
    """`model` (rebuilt from `ckpt`'s spec) with the checkpoint's weights, in eval mode; a mismatch names the file."""
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise ArtifactError(f"{path}: weights do not fit the model {ckpt['spec']}: {str(err)[:300]}") from None
    return model.eval()

