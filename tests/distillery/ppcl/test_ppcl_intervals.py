import itertools

import numpy as np
import pytest
import torch

from distillery.ppcl.adapter import StreamwiseBlock, replace_blocks, trace
from distillery.ppcl.intervals import (Candidate, angular_candidates, angular_distance, bi_candidates, block_influence,
                                  contiguous_intervals, delta, interval_end, pcl_candidates, removed,
                                  select_intervals, threshold_intervals)


def table_from_drops(drops: list[list[float]]) -> np.ndarray:
    """cka(u, k) = 1 - cumulative drops[u][:k-u]."""
    n = len(drops)
    t = np.full((n + 1, n + 1), np.nan)
    for u in range(n + 1):
        t[u, u] = 1.0
        for k in range(u + 1, n + 1):
            t[u, k] = 1.0 - sum(drops[u][:k - u])
    return t


def test_delta_and_first_local_minimum():
    # from u = 0 the marginal drops are 0.05, 0.02, 0.01, 0.03, 0.04, 0.05: Delta falls, then rises after k = 3
    drops = [[0.05, 0.02, 0.01, 0.03, 0.04, 0.05]] + [[0.01] * (6 - u) for u in range(1, 6)]
    t = table_from_drops(drops)
    assert np.allclose(delta(t)[0, 1:], drops[0])
    assert interval_end(t, 0) == 3
    assert interval_end(t, 0, max_len=2) == 2
    assert interval_end(t, 1) == 3  # flat Delta: the shortest allowed interval, two blocks
    assert interval_end(t, 4) == 6
    assert interval_end(t, 5) is None  # one block left: nothing to merge


def test_contiguous_intervals_are_disjoint_contiguous_and_deterministic():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(4, 16))
        t = table_from_drops([list(rng.uniform(0, 0.1, n - u)) for u in range(n)])
        ivs = contiguous_intervals(t, max_len=4)
        assert ivs == contiguous_intervals(t, max_len=4)
        assert ivs[0][0] == 0
        for (u, v), (u2, _) in zip(ivs, ivs[1:]):
            assert u2 == v  # the next interval starts where this one ends
        assert all(2 <= v - u <= 4 and v <= n for u, v in ivs)


def test_select_intervals_is_optimal_and_disjoint():
    rng = np.random.default_rng(1)
    n = 10
    cands = [Candidate(int(u), int(u + L), float(rng.uniform())) for u in range(n) for L in (2, 3)
             if u + L <= n and rng.uniform() < 0.6]
    for ratio in (0.2, 0.3, 0.5):
        chosen = select_intervals(cands, n, ratio)
        target = round(ratio * n)
        cost = {c.interval: c.cost for c in cands}
        best = None  # brute force over all disjoint subsets
        for k in range(len(cands) + 1):
            for sub in itertools.combinations(cands, k):
                ivs = sorted(c.interval for c in sub)
                if any(b[0] < a[1] for a, b in zip(ivs, ivs[1:])) or sum(removed(i) for i in ivs) != target:
                    continue
                total = sum(c.cost for c in sub)
                best = total if best is None else min(best, total)
        assert sum(removed(i) for i in chosen) == target
        assert all(b[0] >= a[1] for a, b in zip(chosen, chosen[1:]))
        assert abs(sum(cost[i] for i in chosen) - best) < 1e-9


def test_select_intervals_nearest_reachable_count_and_drop_mode():
    cands = [Candidate(0, 3, 0.1), Candidate(4, 7, 0.2)]  # each removes 2 with a student
    assert select_intervals(cands, 8, 0.5) == [(0, 3), (4, 7)]  # 4 reachable exactly
    assert select_intervals(cands, 8, 0.37) == [(0, 3), (4, 7)]  # 3 is not; ties go up to 4
    assert select_intervals(cands, 8, 0.3, student=False) == [(0, 3)]  # dropped: each removes 3
    assert select_intervals([], 8, 0.5) == []


def test_threshold_and_pcl_candidates():
    t = table_from_drops([[0.01] * (6 - u) for u in range(6)])
    th = threshold_intervals(t, threshold=0.975)
    assert all(t[c.u, c.v] >= 0.975 for c in th) and th[0].interval == (0, 2)
    pcl = pcl_candidates(t)
    assert [c.u for c in pcl] == [0, 1, 2, 3, 4] and all(c.v - c.u >= 2 for c in pcl)


def test_block_influence_and_angular_distance_see_an_identity_block(model_and_inputs):
    model, adapter, inputs = model_and_inputs
    blocks = list(adapter.blocks(model))
    identity = StreamwiseBlock([torch.nn.Identity() for _ in adapter.streams], adapter.uses_cond)
    with_identity = replace_blocks(model, adapter, blocks[:2] + [identity] + blocks[2:])
    tr = trace(with_identity, adapter, inputs)
    bi = block_influence(tr, adapter)
    assert bi.shape == (5,) and bi[2] == pytest.approx(0, abs=1e-9) and np.all(bi[[0, 1, 3, 4]] > 1e-4)
    ang = angular_distance(tr, adapter, 1)
    assert ang.shape == (5,) and ang[2] == pytest.approx(0, abs=1e-6) and np.all(ang <= 1)
    assert angular_distance(tr, adapter, 3).shape == (3,)
    assert select_intervals(bi_candidates(tr, adapter), 5, 0.2, student=False) == [(2, 3)]
    assert [c.interval for c in angular_candidates(tr, adapter, 2)] == [(0, 2), (1, 3), (2, 4), (3, 5)]
