"""PPCL's selections from the cka table: the Delta rule's intervals and candidates, one disjoint
selection per share of blocks removed, the CKA-threshold ablation and the baseline selectors
(block influence, angular distance), all as plain JSON for the report and the menu."""
from __future__ import annotations

import math

import numpy as np

from distillery.ppcl.adapter import Adapter, Trace
from distillery.ppcl.intervals import (angular_candidates, bi_candidates, block_influence, contiguous_intervals, delta,
                                       pcl_candidates, removed, select_intervals, threshold_intervals, variant_name)


def ratio_key(ratio: float) -> str:
    return f"{ratio:g}"


def _clean(a: np.ndarray) -> list:
    return [[None if not math.isfinite(v) else float(v) for v in row] for row in np.asarray(a, dtype=float)]


def n_removed(intervals, student: bool = True) -> int:
    return sum(removed(tuple(iv), student) for iv in intervals)


def choose(table: np.ndarray, trace: Trace, adapter: Adapter, cfg) -> dict:
    """Every selection the menu and the report need, from the cka table (pure; plain JSON out).

    `cfg` has `ratios` (shares of blocks removed, one variant each), `min_len` / `max_len` (interval
    lengths), `cka_threshold` and `ablation_ratio` (the baseline selector and the variant it matches).
    """
    n = table.shape[0] - 1
    cands = pcl_candidates(table, cfg.min_len, cfg.max_len)
    selected = {ratio_key(r): [list(iv) for iv in select_intervals(cands, n, r)] for r in cfg.ratios}
    target = n_removed(selected[ratio_key(cfg.ablation_ratio)])
    thr = threshold_intervals(table, cfg.cka_threshold, cfg.min_len, cfg.max_len)
    ablation = [list(iv) for iv in select_intervals(thr, n, target / n)] if thr else []
    bi = block_influence(trace, adapter)
    students = sorted({tuple(iv) for s in selected.values() for iv in s})
    return {
        "n_blocks": n,
        "table": _clean(table),
        "delta": _clean(delta(table)),
        "intervals": [list(iv) for iv in contiguous_intervals(table, cfg.min_len, cfg.max_len)],
        "candidates": [{"u": c.u, "v": c.v, "cost": c.cost} for c in cands],
        "selected": selected,
        "removed": {k: n_removed(v) for k, v in selected.items()},
        "variants": {variant_name(r): ratio_key(r) for r in cfg.ratios},
        "students": [list(iv) for iv in students],
        "ablation": {"selector": f"cka_threshold {cfg.cka_threshold:g}", "distillation": "sequential",
                     "ratio": cfg.ablation_ratio, "intervals": ablation, "removed": n_removed(ablation),
                     "target_removed": target},
        "baselines": {
            "block_influence": [float(b) for b in bi],
            "block_influence_drop": {ratio_key(r): [list(iv) for iv in select_intervals(bi_candidates(trace, adapter), n, r,
                                                                                       student=False)]
                                     for r in cfg.ratios},
            "angular_distance": {str(k): [{"u": c.u, "v": c.v, "cost": c.cost} for c in angular_candidates(trace, adapter, k)]
                                 for k in range(cfg.min_len, min(cfg.max_len, n) + 1)},
            "cka_threshold": [{"u": c.u, "v": c.v, "cost": c.cost} for c in thr],
        },
    }
