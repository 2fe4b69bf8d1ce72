"""The zoo's registry: model constructors by name, filled by `@register` in each model module."""
from collections.abc import Callable

import torch.nn as nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Add a model constructor to the zoo under `name`."""
    def wrap(fn):
        MODELS[name] = fn
        return fn
    return wrap
