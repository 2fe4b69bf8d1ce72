"""Model zoo: CIFAR-style classifiers written here (no torchvision), built by name from a small spec.

`build_model(spec)` is the one entry point; `spec` is a plain dict so it can live inside a
checkpoint loaded with `weights_only=True` and rebuild the exact architecture later.
"""
from collections.abc import Callable

import torch.nn as nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Add a model constructor to the zoo under `name`."""
    def wrap(fn):
        MODELS[name] = fn
        return fn
    return wrap


def build_model(spec: dict) -> nn.Module:
    """Build a model from {"arch", "width", "depth", "in_channels", "num_classes", ...}."""
    spec = dict(spec)
    arch = spec.pop("arch")
    if arch not in MODELS:
        raise ValueError(f"unknown model arch {arch!r}; available: {', '.join(sorted(MODELS))}")
    return MODELS[arch](**spec)


from tasks.models import resnet, vgg, wrn, toy, mmdit, vit  # noqa: E402,F401  (registers the models)
