"""The training loop every stage shares: seeded batches, a progress bar, early stopping on val.

Pure: no files, no MLflow. Stages pass `on_epoch` to checkpoint or log, and `state` to resume.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class FitConfig:
    epochs: int
    lr: float
    batch_size: int = 64
    weight_decay: float = 5e-4
    patience: int | None = None  # None: train all epochs and keep the last weights
    seed: int = 0
    augment: bool = True  # random +-1 pixel shifts
    optimizer: str = "sgd"  # sgd (momentum 0.9, cosine) or adam (cosine)


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_val_acc: float = -1.0


Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel: pad by one, crop back at a random offset."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[:, :, dy:dy + h, dx:dx + w]


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1], model in eval mode."""
    was_training = model.training
    model.eval()
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    correct = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / max(1, len(y))


def fit(model: nn.Module, train: tuple, val: tuple, cfg: FitConfig, loss: Loss = cross_entropy,
        after_step: Callable[[nn.Module], None] | None = None,
        on_epoch: Callable[[int, nn.Module, dict, History], None] | None = None,
        state: dict | None = None, desc: str = "train") -> History:
    """Train `model` in place; keep the weights with the best val accuracy when `patience` is set.

    `after_step(model)` runs after every optimiser step (re-applying pruning masks, say);
    `on_epoch(epoch, model, resume_state, history)` after every epoch; `state` is a
    `resume_state` from an earlier, interrupted fit.
    """
    torch.manual_seed(cfg.seed)
    xtr, ytr = torch.as_tensor(train[0]), torch.as_tensor(train[1])
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    steps_per_epoch = math.ceil(len(xtr) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.15, anneal_strategy="cos")
    hist, best_state, start = History(), None, 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        hist = History(epochs=list(state["history"]), best_epoch=state["best_epoch"], best_val_acc=state["best_val_acc"])
        best_state = state.get("best_model")
        start = len(hist.epochs)
    bar = tqdm(range(start, cfg.epochs), desc=desc, unit="epoch", initial=start, total=cfg.epochs, leave=True)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        total, seen = 0.0, 0
        for i in range(0, len(xtr), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            xb = shift(xtr[idx], gen) if cfg.augment else xtr[idx]
            batch_loss = loss(model, xb, ytr[idx])
            opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step(model)
            total += batch_loss.item() * len(idx)
            seen += len(idx)
        val_acc = accuracy(model, *val)
        row = {"epoch": epoch, "train_loss": total / seen, "val_acc": val_acc, "lr": sched.get_last_lr()[0]}
        hist.epochs.append(row)
        if val_acc > hist.best_val_acc:
            hist.best_val_acc, hist.best_epoch = val_acc, epoch
            best_state = copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{val_acc:.4f}", best=f"{hist.best_val_acc:.4f}")
        if on_epoch is not None:
            resume_state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "generator": gen.get_state(), "history": hist.epochs, "best_epoch": hist.best_epoch,
                            "best_val_acc": hist.best_val_acc, "best_model": best_state}
            on_epoch(epoch, model, resume_state, hist)
        if cfg.patience is not None and epoch - hist.best_epoch >= cfg.patience:
            bar.write(f"{desc}: early stop at epoch {epoch}, best val acc {hist.best_val_acc:.4f} at epoch {hist.best_epoch}")
            break
    bar.close()
    if cfg.patience is not None and best_state is not None:
        model.load_state_dict(best_state)
    return hist
