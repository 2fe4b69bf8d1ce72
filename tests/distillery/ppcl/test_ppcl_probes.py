import numpy as np
import torch

from distillery.ppcl.adapter import trace
from distillery.ppcl.probes import ProbeConfig, finetune, fit_probes, fit_residual_linear, relative_error


def test_closed_form_recovers_a_known_residual_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 50, 16, generator=g)  # (batch, tokens, d)
    w, b = torch.randn(16, 16, generator=g) * 0.3, torch.randn(16, generator=g)
    y = x + x @ w + b
    probe = fit_residual_linear(x, y, ridge=0.0)
    assert torch.allclose(probe.linear.weight.T, w, atol=1e-4) and torch.allclose(probe.linear.bias, b, atol=1e-4)
    assert relative_error(probe, x, y) < 1e-8
    shrunk = fit_residual_linear(x, y, ridge=10.0)  # a strong ridge pulls W towards 0
    assert shrunk.linear.weight.norm() < probe.linear.weight.norm()


def test_fine_tuning_reduces_the_error_of_a_shrunk_probe():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=g)
    y = x + x @ (torch.randn(8, 8, generator=g) * 0.5)
    probe = fit_residual_linear(x, y, ridge=5.0)
    before = relative_error(probe, x, y)
    finetune(probe, x, y, ProbeConfig(finetune_steps=200, lr=1e-2, batch_size=256))
    assert relative_error(probe, x, y) < 0.5 * before


def test_probes_for_every_block_and_stream(model_and_inputs):
    model, adapter, inputs = model_and_inputs
    tr = trace(model, adapter, inputs)
    probes, errors = fit_probes(tr, adapter)
    assert len(probes) == 4 and errors.shape == (4, len(adapter.streams))
    assert np.all(errors >= 0) and np.all(errors < 1)  # a linear map explains part of every block's update
    out = adapter.call(probes[1], tr.hidden[1], tr.cond)
    assert [o.shape for o in out] == [h.shape for h in tr.hidden[2]]
