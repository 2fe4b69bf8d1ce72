"""Residual linear probes: one `l_i(X) = X + X W_i + b_i` per block and stream, fitted in closed form.

Rows are tokens (row-vector convention): with X the block's input and T(X) its output, both
(n_tokens, d), `[W; b] = (X1^T X1 + lambda I)^-1 X1^T (T(X) - X)` where X1 = [X, 1] (ridge
regression on the residual). Every probe sees the teacher's own input, so all are fitted
independently from one `trace`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from distillery.models.mmdit import ResidualLinear
from distillery.ppcl.adapter import Adapter, StreamwiseBlock, Trace


@dataclass(frozen=True)
class ProbeConfig:
    ridge: float = 1e-3  # relative to the mean eigenvalue of X^T X, so it does not depend on the scale
    finetune_steps: int = 0  # optional Adam steps on || l(X) - T(X) ||^2 after the closed form
    lr: float = 1e-3
    batch_size: int = 1024  # token rows per fine-tuning step
    seed: int = 0


def rows(x: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, d) -> (batch * tokens, d) in float64."""
    return x.reshape(-1, x.shape[-1]).double()


def fit_residual_linear(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> ResidualLinear:
    """The ResidualLinear that best maps rows `x` to rows `y` (n, d) in the ridge least-squares sense."""
    x, y = rows(x), rows(y)
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
    gram = x1.T @ x1
    lam = ridge * torch.diagonal(gram)[:-1].mean()
    reg = torch.eye(len(gram), dtype=x.dtype, device=x.device) * lam
    reg[-1, -1] = 0  # the bias is not shrunk
    wb = torch.linalg.solve(gram + reg, x1.T @ (y - x))
    probe = ResidualLinear(x.shape[1]).to(x.device)
    with torch.no_grad():
        probe.linear.weight.copy_(wb[:-1].T.float())
        probe.linear.bias.copy_(wb[-1].float())
    return probe


@torch.no_grad()
def relative_error(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """`||m(X) - T(X)||^2 / ||T(X) - X||^2`: the share of the block's update the probe misses."""
    return float(((module(x) - y).pow(2).sum() / (y - x).pow(2).sum().clamp_min(1e-12)).item())


def finetune(module: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ProbeConfig) -> None:
    """Adam on the squared error over random token rows, in place."""
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)
    for _ in range(cfg.finetune_steps):
        idx = torch.randint(0, len(x), (min(cfg.batch_size, len(x)),), generator=gen)
        loss = (module(x[idx]) - y[idx]).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def fit_probes(trace: Trace, adapter: Adapter, cfg: ProbeConfig = ProbeConfig()) -> tuple[list[nn.Module], np.ndarray]:
    """One probe block per teacher block (callable like the block) and the relative fit error of
    every block and stream, shape (L, n_streams)."""
    probes, errors = [], np.zeros((trace.n_blocks, len(adapter.streams)))
    for i in range(trace.n_blocks):
        mods = []
        for s, (x, y) in enumerate(zip(trace.hidden[i], trace.hidden[i + 1])):
            probe = fit_residual_linear(x, y, cfg.ridge)
            if cfg.finetune_steps:
                finetune(probe, x, y, cfg)
            errors[i, s] = relative_error(probe, x, y)
            mods.append(probe)
        probes.append(StreamwiseBlock(mods, adapter.uses_cond))
    return probes, errors


def rebuild_probes(ckpt: dict, dim: int | None = None) -> list[StreamwiseBlock]:
    """The fitted probes of a probe file (`{"probes": [state dicts], "streams": [...]}`); each stream's
    hidden size is read from its weights (`dim` is accepted for old callers and ignored)."""
    probes = []
    for state in ckpt["probes"]:
        dims = [state[f"mods.{k}.linear.weight"].shape[1] for k in range(len(ckpt["streams"]))]
        block = StreamwiseBlock([ResidualLinear(d) for d in dims], uses_cond=True)
        block.load_state_dict(state)
        probes.append(block.eval())
    return probes
