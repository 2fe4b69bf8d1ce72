"""The order ablation's algorithm on a toy net: every order ends sparse and INT8, in ONNX too."""
import onnx
import pytest
import torch
from onnx import numpy_helper

from distillery.compress.chain import ORDERS, ChainConfig, prune_quantized, quantized_sparsity, run_order
from distillery.compress.qat import QuantConv2d, calibrate, export_int8_onnx, int8_initializers, is_quantized, prepare_qat
from distillery.core.params import ABLATION_ORDERS
from distillery.models import build_model
from distillery.training import FitConfig, fit

CFG = ChainConfig(sparsity=0.5, prune_epochs=1, qat_epochs=1, kd_epochs=1, batch_size=32, freeze_observers_epoch=1)


@pytest.fixture(scope="module")
def setup():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 4
    x = torch.randn(96, 1, 8, 8, generator=gen) * 0.3 + y.view(-1, 1, 1, 1).float() / 2
    train, val = (x[:64].numpy(), y[:64].numpy()), (x[64:].numpy(), y[64:].numpy())
    teacher = build_model({"arch": "toy", "width": 0.5, "in_channels": 1, "num_classes": 4})
    fit(teacher, train, val, FitConfig(epochs=1, lr=0.05, batch_size=32))
    return teacher.eval(), train, val, torch.zeros(1, 1, 8, 8)


def int8_weight_zeros(path) -> float:
    graph = onnx.load(str(path)).graph
    names = set(int8_initializers(path))
    weights = [numpy_helper.to_array(i) for i in graph.initializer if i.name in names]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)


@pytest.mark.parametrize("order", ORDERS)
def test_every_order_ends_as_sparse_int8_onnx(setup, order, tmp_path):
    teacher, train, val, example = setup
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = run_order(teacher, order, CFG, train, val, train[0][:32], example, seed=0)
    assert is_quantized(model)
    assert quantized_sparsity(model) >= CFG.sparsity
    path = export_int8_onnx(model, example, tmp_path / f"{order}.onnx")
    assert len(int8_initializers(path)) == 3  # conv1, conv2, fc
    assert int8_weight_zeros(path) >= CFG.sparsity
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the teacher is shared, untouched


def test_quantize_before_prune_keeps_fake_quant_and_fixed_zeros(setup):
    teacher, train, val, example = setup
    qat = prepare_qat(teacher, example)
    calibrate(qat, torch.from_numpy(train[0][:32]))
    prune_quantized(qat, 0.5)
    assert abs(quantized_sparsity(qat) - 0.5) < 0.01
    zeros = {n: m.weight_mask.clone() for n, m in qat.named_modules() if isinstance(m, QuantConv2d)}
    fit(qat, train, val, FitConfig(epochs=1, lr=0.05, batch_size=32))
    assert is_quantized(qat)  # still fake-quantized layers, not floats
    for name, m in qat.named_modules():
        if name in zeros:
            assert torch.equal(m.weight_mask, zeros[name])
            assert not m.effective_weight()[~zeros[name]].any()  # pruned weights stayed zero through training


def test_prune_quantized_counts_earlier_zeros():
    layer = QuantConv2d.from_float(torch.nn.Conv2d(2, 4, 3))
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1, layer.weight.numel() + 1, dtype=torch.float).view_as(layer.weight))
    model = torch.nn.Sequential(layer)
    prune_quantized(model, 0.25)
    prune_quantized(model, 0.5)
    assert quantized_sparsity(model) == pytest.approx(0.5, abs=1 / 72)
    assert (layer.effective_weight().flatten()[:36] == 0).all()  # the smallest half


def test_the_params_schema_allows_exactly_the_chains_orders():
    assert ABLATION_ORDERS == ORDERS


def test_the_chains_pqd_is_the_recipes_steps_in_order(setup):
    """run_order("pqd") gives bit for bit the model that the prune, quantize and distill stages' calls give."""
    from distillery.compress.kd import distill
    from distillery.compress.pruning import finetune_pruned, prune
    from distillery.compress.qat import quantize_aware_train
    teacher, train, val, example = setup
    calib = train[0][:32]
    chained = run_order(teacher, "pqd", CFG, train, val, calib, example, seed=3)
    fit = lambda epochs, lr: FitConfig(epochs=epochs, lr=lr, batch_size=CFG.batch_size, patience=epochs, seed=3)  # noqa: E731
    torch.manual_seed(3)
    model, mask = prune(teacher, "unstructured", CFG.sparsity, example)
    finetune_pruned(model, mask, train, val, fit(CFG.prune_epochs, CFG.prune_lr))
    model = quantize_aware_train(model, mask, train, val, calib, example, fit(CFG.qat_epochs, CFG.qat_lr),
                                 CFG.freeze_observers_epoch)
    stepwise, _ = distill(model, teacher, train, val, fit(CFG.kd_epochs, CFG.kd_lr), CFG.temperature, CFG.alpha)
    a, b = chained.state_dict(), stepwise.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distillation_keeps_the_activation_grid_that_qat_set(setup):
    from distillery.compress.kd import distill
    from distillery.compress.qat import act_quantizers
    teacher, train, val, example = setup
    qat = prepare_qat(teacher, example)
    calibrate(qat, torch.from_numpy(train[0][:32]))
    before = [(q.min_val.clone(), q.max_val.clone()) for q in act_quantizers(qat)]
    student, _ = distill(qat, teacher, train, val, FitConfig(epochs=1, lr=0.01, batch_size=32), 4.0, 0.7)
    after = [(q.min_val, q.max_val) for q in act_quantizers(student)]
    assert all(torch.equal(a0, a1) and torch.equal(b0, b1) for (a0, b0), (a1, b1) in zip(before, after))
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(qat.parameters(), student.parameters()))  # it did train
