"""Knowledge distillation (Hinton et al. 2015): the student matches the teacher's softened outputs."""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from distillery.compress.pruning import apply_masks
from distillery.compress.qat import freeze_observers
from distillery.training import FitConfig, accuracy, fit


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    T^2 keeps the soft term's gradients on the scale of the hard term's as T grows.
    """
    if temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need temperature > 0 and alpha in [0, 1], got T={temperature}, alpha={alpha}")
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1), reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature ** 2 * soft + (1.0 - alpha) * hard


def distillation_loss(teacher: nn.Module, temperature: float, alpha: float
                      ) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A `loss(model, x, y)` for `distillery.training.fit` that distils `teacher` (frozen, eval mode) into the model."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(x)
        return kd_loss(model(x), teacher_logits, y, temperature, alpha)

    return loss


def distill(student: nn.Module, teacher: nn.Module, train: tuple, val: tuple, cfg: FitConfig, temperature: float,
            alpha: float, mask: dict[str, torch.Tensor] | None = None, state: dict | None = None,
            on_epoch=None) -> tuple[nn.Module, dict]:
    """The D step: distil `teacher` into a copy of `student`, the deployed form held fixed.

    Pruning masks of an FP32 student are re-applied after every step (a QAT student's layers hold
    their own); a QAT student's activation ranges stay frozen where QAT left them. With
    `cfg.patience` set, the weights of the best val epoch are kept. Returns (student, record).
    """
    trained = copy.deepcopy(student)
    freeze_observers(trained)  # no-op for an FP32 student
    start_acc = accuracy(trained, *val)
    hist = fit(trained, train, val, cfg, loss=distillation_loss(copy.deepcopy(teacher), temperature, alpha),
               after_step=(lambda m: apply_masks(m, mask)) if mask else None,
               on_epoch=on_epoch, state=state, desc="distill")
    return trained, {"val_acc_before": start_acc, "val_acc_best": hist.best_val_acc}
