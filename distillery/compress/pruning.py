"""Pruning: unstructured magnitude pruning (zeros, same shapes) and channel pruning (smaller shapes).

Unstructured pruning makes the zeros permanent at once: the state_dict keeps plain `weight` keys
and the mask is simply `weight != 0`, so it survives checkpoints, BN folding (folding scales whole
output rows) and QAT, and every later stage recovers it with `masks(model)`.

Channel pruning removes channels physically with Torch-Pruning. A pruned model no longer matches
its constructor, and checkpoints are read with `weights_only=True` (no pickled modules), so a
checkpoint carries `shapes_of(model)` (plain ints) and `rebuild_pruned` resizes a freshly built
model to those shapes before `load_state_dict`.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune
import torch_pruning as tp

from distillery.core.errors import DistilleryError
from distillery.training import FitConfig, History, fit

PRUNABLE = (nn.Conv2d, nn.Linear)


def _prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE)]


def prune_unstructured(model: nn.Module, sparsity: float) -> nn.Module:
    """A copy of `model` with the `sparsity` fraction of smallest-|w| Conv2d/Linear weights zeroed (global L1)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    model = copy.deepcopy(model)
    params = [(m, "weight") for _, m in _prunable(model)]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    return make_permanent(model)


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold any `torch.nn.utils.prune` re-parametrisation into plain `weight` tensors (in place)."""
    for m in model.modules():
        for name in ("weight", "bias"):
            if hasattr(m, f"{name}_orig"):
                torch_prune.remove(m, name)
    return model


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{param name: bool mask}` of the non-zero Conv2d/Linear weights; keys match `named_parameters`."""
    return {f"{name}.weight" if name else "weight": (m.weight.detach() != 0) for name, m in _prunable(model)}


@torch.no_grad()
def apply_masks(model: nn.Module, mask: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place; pass as `fit(after_step=...)` so training cannot regrow them."""
    params = dict(model.named_parameters())
    for name, m in mask.items():
        params[name].mul_(m.to(params[name].dtype))


def sparsity(model: nn.Module) -> float:
    """Fraction of zeros over all Conv2d/Linear weights."""
    weights = [m.weight for _, m in _prunable(model)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(1, total)


@torch.no_grad()
def _classifier(model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Module]:
    """The Conv2d / Linear that runs last on `example_inputs`: the classifier, wherever the class defines it."""
    ran: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, *_: ran.append(m)) for m in model.modules() if isinstance(m, PRUNABLE)]
    try:
        model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return ran[-1:]


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    """The layers inside attention blocks (a module with `num_heads`, or nn.MultiheadAttention).

    Their channels are split into heads (qkv reshaped to [3, heads, head_dim]), which channel
    pruning cannot keep consistent; left whole, only the MLP widths of a transformer are pruned.
    """
    layers = []
    for name, m in model.named_modules():
        if name and (isinstance(m, nn.MultiheadAttention) or hasattr(m, "num_heads")):
            layers += [sub for sub in m.modules() if isinstance(sub, (*PRUNABLE, nn.MultiheadAttention))]
    return layers


def prune_structured(model: nn.Module, ratio: float, example_inputs: torch.Tensor, round_to: int | None = None
                     ) -> nn.Module:
    """A copy of `model` with `ratio` of the channels of every layer group removed (L2 group magnitude);
    with `round_to`, each group keeps a multiple of that many channels (Torch-Pruning's `round_to`). Where
    rounding would leave every layer whole (layers narrower than about twice `round_to`), it prunes
    without rounding and says so.

    The final classifier keeps its outputs and attention layers keep their heads (see
    `_attention_layers`); Torch-Pruning keeps coupled layers (residual adds, BN after conv,
    squeeze-and-excitation gates) consistent.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    pruned = _remove_channels(model, ratio, example_inputs, round_to)
    if round_to and round_to > 1 and ratio > 0 and count_params(pruned) == count_params(model):
        print(f"prune: keeping multiples of {round_to} channels would remove none (the layers are too narrow); "
              "pruned without rounding")
        pruned = _remove_channels(model, ratio, example_inputs, None)
    return pruned


def _remove_channels(model: nn.Module, ratio: float, example_inputs: torch.Tensor, round_to: int | None) -> nn.Module:
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        before = model(example_inputs).shape
    ignored = _classifier(model, example_inputs) + _attention_layers(model)
    pruner = tp.MetaPruner(model, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
                           pruning_ratio=ratio, global_pruning=False, ignored_layers=ignored,
                           **({"round_to": round_to} if round_to and round_to > 1 else {}))
    pruner.step()
    try:
        with torch.no_grad():
            after = model(example_inputs).shape
    except RuntimeError as err:
        raise DistilleryError(f"{type(model).__name__} no longer runs after channel pruning ({str(err).splitlines()[0]}); "
                              "a layer reshapes its channels in a way Torch-Pruning does not track: prune it "
                              "unstructured (method: unstructured) instead") from None
    if after != before:
        raise DistilleryError(f"channel pruning changed the output of {type(model).__name__} from {list(before)} to "
                              f"{list(after)}; prune it unstructured (method: unstructured) instead")
    return model


BatchNorm = nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d


def _layer_norm_1d(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1


def shapes_of(model: nn.Module) -> dict[str, list[int]]:
    """Channel counts of every Conv2d ([out, in, groups]), Linear ([out, in]), BatchNorm and LayerNorm ([n])."""
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            shapes[name] = [m.out_channels, m.in_channels, m.groups]
        elif isinstance(m, nn.Linear):
            shapes[name] = [m.out_features, m.in_features]
        elif isinstance(m, BatchNorm):
            shapes[name] = [m.num_features]
        elif _layer_norm_1d(m):
            shapes[name] = [m.normalized_shape[0]]
    return shapes


def _shapes_from_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, list[int]]:
    shapes = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.Conv2d) and f"{prefix}weight" in state:
            out, in_per_group = state[f"{prefix}weight"].shape[:2]
            depthwise = m.groups == m.in_channels == m.out_channels and m.groups > 1
            groups = out if depthwise else m.groups
            shapes[name] = [out, in_per_group * groups, groups]
        elif isinstance(m, nn.Linear) and f"{prefix}weight" in state:
            shapes[name] = list(state[f"{prefix}weight"].shape)
        elif isinstance(m, BatchNorm) and f"{prefix}running_mean" in state:
            shapes[name] = [len(state[f"{prefix}running_mean"])]
        elif _layer_norm_1d(m) and f"{prefix}weight" in state:
            shapes[name] = [len(state[f"{prefix}weight"])]
    return shapes


def _resize(m: nn.Module, shape: list[int]) -> None:
    def fresh(old: torch.Tensor | None, *size: int):
        if old is None:
            return None
        t = torch.zeros(size, dtype=old.dtype)
        return nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else t

    if isinstance(m, nn.Conv2d):
        m.out_channels, m.in_channels, m.groups = shape
        m.weight = fresh(m.weight, m.out_channels, m.in_channels // m.groups, *m.kernel_size)
        m.bias = fresh(m.bias, m.out_channels)
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = shape
        m.weight = fresh(m.weight, m.out_features, m.in_features)
        m.bias = fresh(m.bias, m.out_features)
    elif isinstance(m, BatchNorm):
        (m.num_features,) = shape
        for attr in ("weight", "bias", "running_mean", "running_var"):
            setattr(m, attr, fresh(getattr(m, attr), m.num_features))
    elif _layer_norm_1d(m):
        m.normalized_shape = tuple(shape)
        for attr in ("weight", "bias"):
            setattr(m, attr, fresh(getattr(m, attr), *shape))


def rebuild_pruned(model: nn.Module, shapes_or_state: dict) -> nn.Module:
    """Resize a freshly built (unpruned) `model` in place to the channel counts of a pruned one.

    `shapes_or_state` is `shapes_of(pruned)` or the pruned model's state_dict; load the weights
    with `load_state_dict` afterwards.
    """
    values = list(shapes_or_state.values())
    shapes = _shapes_from_state(shapes_or_state, model) if values and isinstance(values[0], torch.Tensor) \
        else shapes_or_state
    modules = dict(model.named_modules())
    unknown = sorted(set(shapes) - set(modules))
    if unknown:
        raise ValueError(f"pruned shapes name modules the model lacks: {unknown[:5]}; was it built from the same spec?")
    for name, shape in shapes.items():
        _resize(modules[name], list(shape))
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on `example_inputs` (Torch-Pruning's op counter)."""
    was_training = model.training
    model.eval()
    macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
    model.train(was_training)
    return int(macs)


def model_stats(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, int]:
    """Parameters, non-zero parameters and MACs of a torch model on `example_inputs`."""
    return {"params": count_params(model), "nonzero_params": count_nonzero(model),
            "macs": count_macs(model, example_inputs)}


def prune(model: nn.Module, method: str, amount: float, example_inputs: torch.Tensor, round_to: int | None = None
          ) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    """The P step: a pruned copy of `model` and its masks (None for structured: the zeros are gone).

    `method` "unstructured": global magnitude pruning to `amount` zeros; "structured": Torch-Pruning
    removes `amount` of each layer's channels (each group keeping a multiple of `round_to`, when given).
    """
    model = copy.deepcopy(model).requires_grad_(True)  # a teacher used for KD comes frozen; frozen layers are not pruned
    if method == "unstructured":
        model = prune_unstructured(model, amount)
        return model, masks(model)
    if method == "structured":
        return prune_structured(model, amount, example_inputs, round_to), None
    raise ValueError(f"unknown pruning method {method!r}; use 'unstructured' or 'structured'")


def finetune_pruned(model: nn.Module, mask: dict[str, torch.Tensor] | None, train: tuple, val: tuple, cfg: FitConfig,
                    state: dict | None = None, on_epoch=None, desc: str = "fine-tune pruned") -> History:
    """Fine-tune a pruned model in place with its masks re-applied after every step (no zero regrows)."""
    return fit(model, train, val, cfg, after_step=(lambda m: apply_masks(m, mask)) if mask else None,
               on_epoch=on_epoch, state=state, desc=desc)

