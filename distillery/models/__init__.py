"""Model zoo (CIFAR-style classifiers written here) and users' own networks, built from a small spec.

`build_model(spec)` is the one entry point; `spec` is a plain dict so it can live inside a
checkpoint loaded with `weights_only=True` and rebuild the exact architecture later: either
`{"arch": <zoo name>, ...constructor kwargs}` or `{"factory": "file.py:fn" | "pkg.module:fn", "kwargs": {...}}`
(`distillery.models.factory`).
"""
from pathlib import Path

import torch
import torch.nn as nn

from distillery.core.artifacts import load_checkpoint
from distillery.core.errors import ArtifactError, ParamsError
from distillery.models import factory, mmdit, resnet, toy, vgg, vit, wrn  # noqa: F401  (each registers its models)
from distillery.models.registry import MODELS


def build_model(spec: dict) -> nn.Module:
    """Build a model from {"arch", "width", "depth", "in_channels", "num_classes", ...} or {"factory", "kwargs"}."""
    spec = dict(spec)
    if "factory" in spec:
        return factory.build(spec["factory"], dict(spec.get("kwargs") or {}))
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



def model_spec(model: str, kwargs: dict, in_channels: int, num_classes: int, image_size: int) -> dict:
    """The checkpoint spec of `train.model` with `train.model_kwargs`: a zoo model gets the data's channels,
    classes (and, for VGG, image size) unless the kwargs say otherwise; a factory gets its kwargs as they are."""
    if factory.is_factory(model):
        return {"factory": model, "kwargs": dict(kwargs)}
    if model not in MODELS:
        raise ParamsError(f"train.model = {model!r}: not a zoo model ({', '.join(sorted(MODELS))}) nor a factory "
                          "reference (path/to/file.py:function or package.module:function)")
    for key, low, high in (("width", 0, 16), ("depth", 1, 64)):  # the zoo's scaling knobs
        value = kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not (low < value <= high if key == "width" else low <= value <= high)):
            raise ParamsError(f"train.model_kwargs.{key} = {value!r}: the zoo's {key} must be a number in "
                              f"{'(0, 16]' if key == 'width' else '[1, 64]'}")
    spec = {"arch": model, "in_channels": in_channels, "num_classes": num_classes, **kwargs}
    if model in ("vgg16_bn", "vit"):  # their classifier's input size follows the image size
        spec.setdefault("image_size", image_size)
    return spec


def build_teacher(spec: dict, weights: str | None = None) -> nn.Module:
    """The model a spec describes, with the user's trained weights when given; every failure is one ParamsError."""
    try:
        model = build_model(spec)
    except TypeError as err:  # a zoo constructor given a keyword it does not take
        raise ParamsError(f"train.model_kwargs: {err}; allowed keywords are the constructor's") from None
    except (ValueError, AssertionError) as err:  # a zoo constructor refusing a value (WRN depth 6n+4, ...)
        raise ParamsError(f"train.model = {spec.get('arch')!r} with train.model_kwargs: {err}") from None
    if weights is not None:
        factory.load_user_weights(model, weights)
    return model


def check_classifier(model: nn.Module, x: torch.Tensor, num_classes: int, classes: list[str] | None = None) -> None:
    """One batch of the data through the model: it must give one score per class of the data."""
    shape = tuple(x.shape)
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as err:
        raise ParamsError(f"the model fails on a batch of the prepared images, shape {shape}: {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:300] if str(err) else ''}; check prepare.image_size and "
                          "prepare.grayscale against the input the model expects") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ParamsError(f"the model returns a {type(out).__name__}, not a tensor of class scores; wrap it so that "
                          "forward returns the logits")
    if out.dim() != 2 or out.shape[0] != shape[0] or out.shape[1] != num_classes:
        named = f" ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})" if classes else ""
        raise ParamsError(f"the model outputs shape {tuple(out.shape)} for {shape[0]} images, but the data has "
                          f"{num_classes} classes{named}: set the number of classes in train.model_kwargs to "
                          f"{num_classes}, or check prepare.path")
