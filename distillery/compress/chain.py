"""Prune (P), quantize (Q: INT8 QAT) and distill (D) in any order: the recipe's chain, written once.

    model = run_order(teacher, "pqd", ChainConfig(), train, val, calib_x, example, seed=0)
    export_int8_onnx(model, example, "student.int8.onnx")

Every order starts from a copy of the same FP32 teacher and ends as a fake-quantized model (sparse
when pruning was unstructured), deployed the same way (`export_int8_onnx`). The steps are the
ones the PQD recipe's stages call (`pruning.prune` + `finetune_pruned`, `qat.quantize_aware_train`,
`kd.distill`), with the same mask and observer handling:

- P on an FP32 model: `prune` (global magnitude, or channels), fine-tune with the masks re-applied.
- P on a QAT model (Q before P): global magnitude over the quantized layers' weights (BN already
  folded), the masks set in the layers; fine-tuned with the fake-quant on and the ranges frozen.
- Q: BN folding, fake-quant, calibration, QAT; an earlier P's masks carried into the layers.
- D: KD from the FP32 teacher into the model as it is, masks fixed; once QAT has set the
  activation ranges, no later step moves them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from distillery.compress.kd import distill
from distillery.compress.pruning import finetune_pruned, prune
from distillery.compress.qat import QuantConv2d, QuantLinear, is_quantized, quantize_aware_train
from distillery.training import FitConfig

ORDERS = ("pqd", "pdq", "qpd", "qdp", "dpq", "dqp")  # p = prune, q = quantize (QAT), d = distill
QUANT_LAYERS = (QuantConv2d, QuantLinear)


@dataclass(frozen=True)
class ChainConfig:
    """The budget and settings of one chain; the paper's ablation budget is 20 / 40 / 40 epochs."""
    method: Literal["unstructured", "structured"] = "unstructured"
    sparsity: float = 0.5  # unstructured: share of weights zeroed (global magnitude)
    ratio: float = 0.5  # structured: share of each layer's channels removed
    round_to: int = 0  # structured: each layer keeps a multiple of this many channels (0 = any count)
    prune_epochs: int = 1  # fine-tune after pruning
    qat_epochs: int = 2
    kd_epochs: int = 2
    prune_lr: float = 0.01
    qat_lr: float = 0.005
    kd_lr: float = 0.001
    batch_size: int = 64
    temperature: float = 4.0
    alpha: float = 0.7  # alpha * T^2 * KL + (1 - alpha) * CE
    freeze_observers_epoch: int = 1  # QAT epoch from which activation ranges stay put

    def fit(self, step: str, seed: int) -> FitConfig:
        """The training settings of step 'p', 'q' or 'd': all epochs run, the best val epoch kept."""
        epochs, lr = {"p": (self.prune_epochs, self.prune_lr), "q": (self.qat_epochs, self.qat_lr),
                      "d": (self.kd_epochs, self.kd_lr)}[step]
        return FitConfig(epochs=epochs, lr=lr, batch_size=self.batch_size, patience=epochs, seed=seed)


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


def _prune_step(model: nn.Module, cfg: ChainConfig, train, val, example: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    if is_quantized(model):
        if cfg.method != "unstructured":
            raise ValueError("structured pruning after QAT is not supported: channels cannot be removed from a "
                             "fake-quantized graph; put P before Q or use method 'unstructured'")
        model, mask = prune_quantized(model, cfg.sparsity), None  # the masks now live in the layers
    else:
        model, mask = prune(model, cfg.method, cfg.sparsity if cfg.method == "unstructured" else cfg.ratio, example,
                            cfg.round_to or None)
    if cfg.prune_epochs:
        finetune_pruned(model, mask, train, val, cfg.fit("p", seed), desc="P fine-tune")
    return model, mask


def run_order(teacher: nn.Module, order: str, cfg: ChainConfig, train: tuple, val: tuple, calib_x: np.ndarray,
              example: torch.Tensor, seed: int = 0) -> nn.Module:
    """The fake-quantized model that `order` (e.g. "pqd") makes from a copy of `teacher` with `seed`."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; allowed: {', '.join(ORDERS)}")
    model, mask = copy.deepcopy(teacher).eval(), None
    for step in order:
        if step == "p":
            model, mask = _prune_step(model, cfg, train, val, example, seed)
        elif step == "q":
            model = quantize_aware_train(model, mask, train, val, calib_x, example, cfg.fit("q", seed),
                                         cfg.freeze_observers_epoch)
            mask = None  # the masks now live in the QAT layers
        elif cfg.kd_epochs:
            model, _ = distill(model, teacher, train, val, cfg.fit("d", seed), cfg.temperature, cfg.alpha,
                               None if is_quantized(model) else mask)
    return model.eval()
