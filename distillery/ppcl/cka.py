"""Linear CKA and the table cka(u, k): the teacher with blocks u+1..k (paper numbering) replaced by
their linear probes, compared with the teacher on its final hidden output.

In the 0-based slice convention of `adapter`, T[u->k] runs teacher blocks[:u], probes[u:k], then
teacher blocks[k:]; cka(u, u) = 1 (nothing replaced).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from distillery.ppcl.adapter import Adapter, Trace


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA of two representations of the same n examples, `(n, ...)` each, flattened per
    example and centred: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), computed with n x n Gram matrices."""
    x = torch.as_tensor(x).reshape(len(x), -1).double()
    y = torch.as_tensor(y).reshape(len(y), -1).double()
    x, y = x - x.mean(0), y - y.mean(0)
    kx, ky = x @ x.T, y @ y.T
    den = torch.linalg.norm(kx) * torch.linalg.norm(ky)
    return float((kx * ky).sum() / den) if den > 0 else 0.0


@torch.no_grad()
def cka_table(teacher: nn.Module, adapter: Adapter, probes: Sequence[nn.Module], trace: Trace) -> np.ndarray:
    """(L+1, L+1) array with cka(u, k) for 0 <= u <= k <= L and NaN below the diagonal."""
    blocks = list(adapter.blocks(teacher))
    n = len(blocks)
    reference = trace.hidden[n][adapter.output_stream]
    table = np.full((n + 1, n + 1), np.nan)
    for u in range(n + 1):
        table[u, u] = 1.0
        states = trace.hidden[u]
        for k in range(u + 1, n + 1):
            states = adapter.call(probes[k - 1], states, trace.cond)
            final = adapter.run(blocks[k:], states, trace.cond)
            table[u, k] = linear_cka(reference, final[adapter.output_stream])
    return table
