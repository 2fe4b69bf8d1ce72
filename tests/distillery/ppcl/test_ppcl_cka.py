import numpy as np
import torch

from distillery.ppcl.adapter import trace
from distillery.ppcl.cka import cka_table, linear_cka
from distillery.ppcl.probes import fit_probes


def test_linear_cka_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 20, generator=g)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g))
    assert abs(linear_cka(x, x) - 1) < 1e-9
    assert abs(linear_cka(x, x @ q) - 1) < 1e-9  # orthogonal transform
    assert abs(linear_cka(x, 7.5 * x + 3.0) - 1) < 1e-9  # isotropic scale and a shift (centring)
    assert abs(linear_cka(x, x @ q) - linear_cka(x @ q, x)) < 1e-12
    assert linear_cka(x, torch.randn(100, 20, generator=g)) < 0.4
    skew = x * torch.linspace(0.1, 3, 20)  # anisotropic scaling is not invariant
    assert linear_cka(x, skew) < 0.99
    assert abs(linear_cka(x.reshape(100, 4, 5), x.numpy()) - 1) < 1e-9  # flattened per example


def test_cka_table_indexing(model_and_inputs):
    model, adapter, inputs = model_and_inputs
    tr = trace(model, adapter, inputs)
    blocks = list(adapter.blocks(model))
    exact = cka_table(model, adapter, blocks, tr)  # "probes" that are the blocks themselves
    assert np.allclose(exact[np.triu_indices(5)], 1.0, atol=1e-6)
    probes, _ = fit_probes(tr, adapter)
    table = cka_table(model, adapter, probes, tr)
    assert table.shape == (5, 5) and np.isnan(table[np.tril_indices(5, -1)]).all()
    upper = table[np.triu_indices(5, 1)]
    assert np.all((upper > 0) & (upper <= 1 + 1e-9)) and np.any(upper < 0.999)
    assert np.allclose(np.diag(table), 1.0)
