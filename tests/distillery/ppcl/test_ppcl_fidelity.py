"""Fidelity to the teacher: accumulated batch by batch it equals the whole-set figures; padding is not counted."""
import math

import pytest
import torch

from distillery.ppcl.fidelity import FidelityMeter, output_fidelity
from distillery.ppcl.textlm import compare_lm


def test_the_meter_batch_by_batch_equals_the_whole_set():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(10, 12, 64, generator=g)
    v = t + 0.5 * torch.randn(10, 12, 64, generator=g)
    ids = torch.randint(0, 64, (10, 12), generator=g)
    meter = FidelityMeter(language_model=True)
    for i in range(0, 10, 3):
        meter.update(t[i:i + 3], v[i:i + 3], ids[i:i + 3])
    got, whole, lm = meter.result(), output_fidelity(t, v), compare_lm(t, v, ids)
    for k in ("cosine", "cosine_min", "relative_error"):
        assert got[k] == pytest.approx(whole[k], rel=1e-9), k
    for k in ("next_token_agreement", "perplexity_teacher", "perplexity_variant", "perplexity_ratio"):
        assert got[k] == pytest.approx(lm[k], rel=1e-6), k
    same = FidelityMeter(True)
    same.update(t, t, ids)
    assert same.result()["perplexity_ratio"] == 1 and same.result()["relative_error"] == 0


def test_padding_positions_are_not_counted():
    vocab, ids = 8, torch.tensor([[1, 2, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    good = torch.full((1, 5, vocab), -10.0)
    good[0, torch.arange(4), ids[0, 1:]] = 10.0  # predicts the next token everywhere
    good[0, 2:, :] = 0.0  # ... but is uniform from position 2 on: only padding targets there, or the last token
    good[0, 1, 3] = 10.0
    meter = FidelityMeter(True)
    meter.update(good, good, ids, mask)
    res = meter.result()
    assert meter.count == 2  # positions 0 -> 1 and 1 -> 2; 2 -> 3 and later predict padding
    assert res["perplexity_teacher"] == pytest.approx(math.exp(0), abs=1e-6)
