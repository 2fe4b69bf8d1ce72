"""Which contiguous runs of blocks to replace: PPCL's CKA-difference rule and the baselines.

An interval (u, v) is the slice `blocks[u:v]` (paper blocks u+1..v), mapping hidden state h_u to
h_v. Replaced by ONE student it removes v - u - 1 blocks; dropped outright it removes v - u.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from distillery.ppcl.adapter import Adapter, Trace

Interval = tuple[int, int]


@dataclass(frozen=True)
class Candidate:
    u: int
    v: int
    cost: float  # lower is better: 1 - cka(u, v), or the baseline's distance

    @property
    def interval(self) -> Interval:
        return (self.u, self.v)


def delta(table: np.ndarray) -> np.ndarray:
    """Delta(u, k) = -(cka(u, k) - cka(u, k-1)) for k > u: how much CKA block k costs the interval
    started at u; NaN elsewhere."""
    out = np.full_like(table, np.nan)
    n = table.shape[0] - 1
    for u in range(n):
        out[u, u + 1:] = -(table[u, u + 1:] - table[u, u:-1])
    return out


def interval_end(table: np.ndarray, u: int, min_len: int = 2, max_len: int | None = None,
                 tol: float = 1e-9) -> int | None:
    """Where the interval started at u ends: the first local minimum of k -> Delta(u, k), looked for
    from k = u + min_len (a one-block interval saves nothing), i.e. the first k where Delta does not
    fall by more than `tol` at k + 1; the last block if Delta keeps falling, never beyond `max_len`
    blocks. None when fewer than `min_len` blocks follow u."""
    n = table.shape[0] - 1
    last = n if max_len is None else min(n, u + max_len)
    if u + min_len > last:
        return None
    d = delta(table)[u]
    for k in range(u + min_len, last):
        if d[k + 1] >= d[k] - tol:
            return k
    return last


def pcl_candidates(table: np.ndarray, min_len: int = 2, max_len: int | None = None) -> list[Candidate]:
    """For every start u the interval the Delta rule gives, costed 1 - cka(u, v); they may overlap."""
    out = []
    for u in range(table.shape[0] - 1):
        v = interval_end(table, u, min_len, max_len)
        if v is not None:
            out.append(Candidate(u, v, float(1.0 - table[u, v])))
    return out


def contiguous_intervals(table: np.ndarray, min_len: int = 2, max_len: int | None = None) -> list[Interval]:
    """The paper's disjoint intervals, greedily from the first block: the interval from u ends at
    v = interval_end(u), the next one starts at v; a start with too few blocks left is skipped."""
    out, u, n = [], 0, table.shape[0] - 1
    while u < n:
        v = interval_end(table, u, min_len, max_len)
        if v is None:
            break
        out.append((u, v))
        u = v
    return out


def threshold_intervals(table: np.ndarray, threshold: float, min_len: int = 2,
                        max_len: int | None = None) -> list[Candidate]:
    """Baseline: from each start u, the longest interval keeping cka(u, v) >= threshold."""
    out, n = [], table.shape[0] - 1
    for u in range(n):
        last = n if max_len is None else min(n, u + max_len)
        ok = [v for v in range(u + min_len, last + 1) if table[u, v] >= threshold]
        if ok:
            out.append(Candidate(u, max(ok), float(1.0 - table[u, max(ok)])))
    return out


def _flat(states: tuple, stream: int) -> torch.Tensor:
    x = states[stream]
    return x.reshape(-1, x.shape[-1]).double()


def block_influence(trace: Trace, adapter: Adapter) -> np.ndarray:
    """ShortGPT's BI_i = 1 - mean over tokens of cos(h_i, h_{i+1}) on the output stream, shape (L,)."""
    s = adapter.output_stream
    return np.array([1.0 - F.cosine_similarity(_flat(trace.hidden[i], s), _flat(trace.hidden[i + 1], s), dim=-1)
                     .mean().item() for i in range(trace.n_blocks)])


def angular_distance(trace: Trace, adapter: Adapter, n: int) -> np.ndarray:
    """Gromov et al.: arccos(cos(h_l, h_{l+n})) / pi averaged over tokens, for l = 0..L-n."""
    s = adapter.output_stream
    out = []
    for l in range(trace.n_blocks - n + 1):
        cos = F.cosine_similarity(_flat(trace.hidden[l], s), _flat(trace.hidden[l + n], s), dim=-1)
        out.append(torch.arccos(cos.clamp(-1, 1)).mean().item() / math.pi)
    return np.array(out)


def bi_candidates(trace: Trace, adapter: Adapter) -> list[Candidate]:
    """Every single block, costed by its block influence (select with `student=False`: ShortGPT drops)."""
    return [Candidate(i, i + 1, float(b)) for i, b in enumerate(block_influence(trace, adapter))]


def angular_candidates(trace: Trace, adapter: Adapter, n: int) -> list[Candidate]:
    """Every run of n blocks, costed by its angular distance."""
    return [Candidate(l, l + n, float(d)) for l, d in enumerate(angular_distance(trace, adapter, n))]


def removed(interval: Interval, student: bool = True) -> int:
    return interval[1] - interval[0] - (1 if student else 0)


def select_intervals(candidates: list[Candidate], n_blocks: int, ratio: float, student: bool = True) -> list[Interval]:
    """The disjoint subset of `candidates` removing round(ratio * n_blocks) blocks at the lowest summed
    cost (exact dynamic programme over block positions). When no subset removes exactly that many, the
    nearest count that one can reach is used, ties going to the larger. Sorted by start."""
    target = round(ratio * n_blocks)
    by_end: dict[int, list[Candidate]] = {}
    for c in candidates:
        if 0 <= c.u < c.v <= n_blocks and removed(c.interval, student) > 0:
            by_end.setdefault(c.v, []).append(c)
    inf = float("inf")
    # best[p][r]: lowest cost of disjoint candidates inside blocks[:p] removing r blocks, with its choice
    best = [[(inf, ())] * (n_blocks + 1) for _ in range(n_blocks + 1)]
    best[0][0] = (0.0, ())
    for p in range(1, n_blocks + 1):
        row = list(best[p - 1])
        for c in sorted(by_end.get(p, []), key=lambda c: (c.u, c.cost)):
            r0 = removed(c.interval, student)
            for r in range(r0, n_blocks + 1):
                cost, chosen = best[c.u][r - r0]
                if cost + c.cost < row[r][0]:
                    row[r] = (cost + c.cost, chosen + (c.interval,))
        best[p] = row
    reachable = [r for r in range(n_blocks + 1) if best[n_blocks][r][0] < inf]
    r = min(reachable, key=lambda r: (abs(r - target), -r))
    return sorted(best[n_blocks][r][1])


def variant_name(ratio: float) -> str:
    """The menu's name of the variant that removes `ratio` of the blocks, e.g. 0.25 -> "ppcl25"."""
    return f"ppcl{round(100 * ratio)}"
