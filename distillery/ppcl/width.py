"""Width pruning: swap chosen MLPs (FFNs) for residual linear projectors `y = x + W x + b`.

A target is (block index, stream index) into the model's adapter: for the MMDiT stream 0 is the
image FFN, stream 1 the text-stream MLP (the text attention and its QKV stay). The projector maps
the MLP's own input to its output; it is initialised by ridge least squares on that pair and then
trained, alone, with L1 between the L2-normalised block output and the unpruned block's, each block
fed the unpruned model's own input (so blocks are independent, as in depth distillation).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from distillery.ppcl.adapter import Adapter, Trace
from distillery.ppcl.depth import DistillConfig, train_block
from distillery.ppcl.probes import fit_residual_linear

Target = tuple[int, int]  # (block, stream)


@dataclass(frozen=True)
class WidthConfig:
    ridge: float = 1e-3  # relative ridge of the least-squares init (see probes.fit_residual_linear)
    steps: int = 150  # training steps per block after the init; 0 keeps the least-squares projector
    lr: float = 3e-4  # the least-squares init is close already; larger rates undo it
    batch_size: int = 128
    seed: int = 0


@torch.no_grad()
def mlp_io(block: nn.Module, adapter: Adapter, stream: int, states, cond) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output of one stream's MLP inside `block`, captured by a forward hook."""
    seen = {}
    mlp = getattr(block, adapter.mlp_attrs[stream])
    handle = mlp.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    try:
        adapter.call(block, states, cond)
    finally:
        handle.remove()
    return seen["x"], seen["y"]


def _stream_error(block: nn.Module, adapter: Adapter, stream: int, states, cond, target) -> float:
    with torch.no_grad():
        out = adapter.call(block, states, cond)[stream]
        return float(((out - target[stream]).pow(2).sum() / (target[stream] - states[stream]).pow(2).sum()
                      .clamp_min(1e-12)).item())


def linearized_block(block: nn.Module, adapter: Adapter, streams: Sequence[int], states, cond,
                     ridge: float) -> nn.Module:
    """A copy of `block` with the MLPs of `streams` replaced by least-squares projectors."""
    new = copy.deepcopy(block)
    for s in streams:
        x, y = mlp_io(block, adapter, s, states, cond)
        setattr(new, adapter.mlp_attrs[s], fit_residual_linear(x, y, ridge))
    return new


def mlp_linear_errors(model: nn.Module, adapter: Adapter, trace: Trace, ridge: float = 1e-3) -> np.ndarray:
    """(L, n_streams): relative error of each block's output stream when that stream's MLP is replaced
    by its least-squares projector, ||B'(h) - B(h)||^2 / ||B(h) - h||^2 (NaN where a block has no such
    MLP). `trace` is of `model`."""
    blocks = adapter.blocks(model)
    errors = np.full((len(blocks), len(adapter.mlp_attrs)), np.nan)
    for i, block in enumerate(blocks):
        for s in range(len(adapter.mlp_attrs)):
            if not isinstance(getattr(block, adapter.mlp_attrs[s], None), nn.Module):
                continue  # this block has no such MLP (Flux's single-stream blocks): not a target
            new = linearized_block(block, adapter, [s], trace.hidden[i], trace.cond, ridge)
            errors[i, s] = _stream_error(new, adapter, s, trace.hidden[i], trace.cond, trace.hidden[i + 1])
    return errors


def lowest_error_targets(errors: np.ndarray, n: int, stream: int | None = None) -> list[Target]:
    """The n (block, stream) pairs with the lowest linearisation error, optionally of one stream only."""
    pairs = [(i, s) for i in range(errors.shape[0]) for s in range(errors.shape[1])
             if (stream is None or s == stream) and np.isfinite(errors[i, s])]
    return sorted(sorted(pairs, key=lambda p: (errors[p], p))[:n])


def linearize_mlps(model: nn.Module, adapter: Adapter, trace: Trace, targets: Sequence[Target],
                   cfg: WidthConfig = WidthConfig()) -> tuple[nn.Module, list[dict]]:
    """A copy of `model` with the target MLPs replaced, and a report per target: the relative
    block-output error (see `mlp_linear_errors`) after the least-squares init and after training, and
    the training loss (L1 of normalised block outputs, all streams of the block) before and after."""
    new = copy.deepcopy(model)
    blocks = adapter.blocks(new)
    train_cfg = DistillConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, loss="normalized_l1", seed=cfg.seed)
    report = []
    for i in sorted({b for b, _ in targets}):
        streams = sorted({s for b, s in targets if b == i})
        states, target = trace.hidden[i], trace.hidden[i + 1]
        block = linearized_block(blocks[i], adapter, streams, states, trace.cond, cfg.ridge)
        init = {s: _stream_error(block, adapter, s, states, trace.cond, target) for s in streams}
        for p in block.parameters():
            p.requires_grad_(False)
        params = [p for s in streams for p in getattr(block, adapter.mlp_attrs[s]).parameters()]
        for p in params:
            p.requires_grad_(True)
        hist = train_block(block, adapter, states, trace.cond, target, train_cfg, params=params, desc=f"width {i}")
        for p in block.parameters():
            p.requires_grad_(True)
        blocks[i] = block
        report += [{"block": i, "stream": adapter.streams[s], "error_init": init[s],
                    "error_trained": _stream_error(block, adapter, s, states, trace.cond, target),
                    "loss_init": hist.initial, "loss_trained": hist.final} for s in streams]
    adapter.put_blocks(new, list(blocks))  # a stack assembled from several attributes is a fresh list
    return new, report
