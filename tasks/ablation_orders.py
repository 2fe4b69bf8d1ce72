"""The order ablation's algorithm: prune (P), quantize (Q, INT8 QAT) and distill (D) in any order.

Pure: model in, model out, no files. Every order starts from a copy of the same FP32 teacher and
ends as a sparse QAT model, so every order is deployed the same way (`export_int8_onnx`).

- P on an FP32 model: global magnitude pruning (`prune_unstructured`), fine-tune with the masks re-applied.
- P on a QAT model (Q before P): global magnitude over the QuantConv2d / QuantLinear weights
  (BN already folded), the masks set in the layers so the zeros stay fixed; fine-tuned with the
  fake-quant on.
- Q: BN folding, fake-quant, calibration, QAT; masks of an earlier P carried into the layers.
- D: KD from the FP32 teacher into the model as it is (FP32 or fake-quant), masks fixed.
Activation ranges freeze during QAT; any later training step on the QAT model lets them follow
the data again (EMA), as the PQD recipe's distill stage does.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

from tasks.compress.pruning import apply_masks, masks, prune_unstructured
from tasks.compress.qat import QuantConv2d, QuantLinear, freeze_observers
from tasks.config import ABLATION_ORDERS, AblationConfig, DistillConfig, QuantizeConfig
from tasks.training import FitConfig, fit

QUANT_LAYERS = (QuantConv2d, QuantLinear)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANT_LAYERS) for m in model.modules())


@torch.no_grad()
def prune_quantized(model: nn.Module, sparsity: float) -> nn.Module:
    """Global magnitude pruning of a QAT model's quantized layers, in place; the masks live in the layers."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    layers = [m for m in model.modules() if isinstance(m, QUANT_LAYERS)]
    scores = torch.cat([m.effective_weight().detach().abs().flatten() for m in layers])
    keep = torch.ones_like(scores, dtype=torch.bool)
    k = int(round(sparsity * scores.numel()))
    if k:
        keep[torch.topk(scores, k, largest=False).indices] = False
    start = 0
    for m in layers:
        n = m.weight.numel()
        mask = keep[start:start + n].view_as(m.weight)
        if m.weight_mask is not None:
            mask &= m.weight_mask
        m.set_mask(mask)
        start += n
    return model


def quantized_sparsity(model: nn.Module) -> float:
    """Share of zeros over the weights that are deployed (effective weights of the quantized layers)."""
    weights = [m.effective_weight() for m in model.modules() if isinstance(m, QUANT_LAYERS)]
    return sum(int((w == 0).sum()) for w in weights) / max(1, sum(w.numel() for w in weights))


def _prune(model: nn.Module, mask: dict | None, cfg: AblationConfig, train, val, seed: int):
    torch.manual_seed(seed)
    if is_quantized(model):
        freeze_observers(model, False)
        model, mask, keep = prune_quantized(model, cfg.sparsity), None, None
    else:
        model = prune_unstructured(model, cfg.sparsity)
        mask = masks(model)
        keep = lambda m: apply_masks(m, mask)  # noqa: E731
    if cfg.prune_epochs:
        fit(model, train, val, FitConfig(epochs=cfg.prune_epochs, lr=cfg.prune_lr, batch_size=cfg.batch_size,
                                         patience=cfg.prune_epochs, seed=seed), after_step=keep, desc="P fine-tune")
    return model, mask


def _quantize(model: nn.Module, mask: dict | None, cfg: AblationConfig, train, val, calib_x: np.ndarray,
              example: torch.Tensor, seed: int) -> nn.Module:
    from tasks.quantize import quantize_aware_train
    qcfg = QuantizeConfig(method="qat", epochs=cfg.qat_epochs, lr=cfg.qat_lr, batch_size=cfg.batch_size,
                          calibration_size=cfg.calibration_size, freeze_observers_epoch=cfg.freeze_observers_epoch,
                          seed=seed)
    return quantize_aware_train(model, mask, qcfg, train, val, calib_x, example)


def _distill(model: nn.Module, teacher: nn.Module, mask: dict | None, cfg: AblationConfig, train, val,
             seed: int) -> nn.Module:
    from tasks.distill import distill
    if not cfg.kd_epochs:
        return model
    if is_quantized(model):
        freeze_observers(model, False)
    dcfg = DistillConfig(epochs=cfg.kd_epochs, lr=cfg.kd_lr, batch_size=cfg.batch_size, temperature=cfg.temperature,
                         alpha=cfg.alpha, seed=seed)
    return distill(model, teacher, dcfg, train, val, mask, select_on_val=False)[0]


def run_order(teacher: nn.Module, order: str, cfg: AblationConfig, train: tuple, val: tuple, calib_x: np.ndarray,
              example: torch.Tensor, seed: int) -> nn.Module:
    """The QAT model (sparse, fake-quant) that `order` makes from a copy of `teacher` with `seed`."""
    if order not in ABLATION_ORDERS:
        raise ValueError(f"unknown order {order!r}; allowed: {', '.join(ABLATION_ORDERS)}")
    model, mask = copy.deepcopy(teacher).eval(), None
    frozen_teacher = copy.deepcopy(teacher).eval()
    for step in order:
        if step == "p":
            model, mask = _prune(model, mask, cfg, train, val, seed)
        elif step == "q":
            model, mask = _quantize(model, mask, cfg, train, val, calib_x, example, seed), None  # masks now in the layers
        else:
            model = _distill(model, frozen_teacher, mask, cfg, train, val, seed)
    return model.eval()
