"""QAT: BN folding, fake-quant with STE, fixed masks, checkpoints, and the INT8 ONNX that ORT fuses."""
import collections
import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from distillery.compress import pruning, qat
from distillery.data import load_digits_bundled
from distillery.models import build_model
from distillery.onnx_export import run_onnx
from distillery.training import FitConfig, accuracy, fit

SPECS = {
    "toy": {"arch": "toy", "in_channels": 1},
    "resnet18": {"arch": "resnet18", "width": 0.125, "in_channels": 1},
    "vgg16_bn": {"arch": "vgg16_bn", "width": 0.125, "depth": 1, "in_channels": 1, "image_size": 8},
    "wrn28_10": {"arch": "wrn28_10", "width": 1, "depth": 10, "in_channels": 1},
}


def _with_bn_stats(spec: dict) -> torch.nn.Module:
    """A model whose BatchNorms hold non-trivial statistics, so folding has something to fold."""
    torch.manual_seed(0)
    model = build_model(spec).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(32, 1, 8, 8) * 3 + 1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    x, y, _ = load_digits_bundled()
    x = (x - x.mean()) / x.std()
    return torch.as_tensor(x[:1200]), torch.as_tensor(y[:1200]), torch.as_tensor(x[1200:]), torch.as_tensor(y[1200:])


@pytest.fixture(scope="module")
def trained_qat(digits):
    """A toy net trained briefly in FP32, then fine-tuned one epoch with QAT."""
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    model = build_model(SPECS["toy"])
    fit(model, (xtr, ytr), (xte, yte), FitConfig(epochs=4, lr=0.03, optimizer="adam", augment=False))
    model.eval()
    q = qat.prepare_qat(model, xtr[:1])
    qat.calibrate(q, xtr[:256])
    fit(q, (xtr, ytr), (xte, yte), FitConfig(epochs=1, lr=1e-3, optimizer="adam", augment=False))
    return model, q.eval()


@pytest.fixture(scope="module")
def int8_onnx(trained_qat, digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("qat") / "toy.int8.onnx"
    return qat.export_int8_onnx(trained_qat[1], digits[0][:1], path)


def _ort_optimized_ops(path, tmp_path) -> collections.Counter:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("arch", list(SPECS))
def test_fold_batchnorm_preserves_outputs(arch):
    model = _with_bn_stats(SPECS[arch])
    folded = qat.fold_batchnorm(model)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-4)
    left = [n for n, m in folded.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if arch == "wrn28_10":  # pre-activation BNs follow an add, not a conv: they stay
        assert left and all(n.endswith(("bn1", "bn")) for n in left)
    else:
        assert left == []
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # input untouched


def test_weight_fake_quant_is_symmetric_int8_per_channel():
    w = torch.randn(6, 3, 3, 3) * torch.arange(1, 7).view(6, 1, 1, 1)
    scale = qat.weight_scale(w)
    levels = qat.fake_quant_weight(w) / scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert levels.abs().amax(dim=(1, 2, 3)).round().tolist() == [127.0] * 6
    assert (qat.fake_quant_weight(w) - w).abs().max() <= scale.max() / 2 + 1e-6


def test_act_quant_is_affine_uint8_with_exact_zero_and_ema():
    q = qat.ActQuant(momentum=0.5).train()
    x = torch.linspace(-1.0, 3.0, 101)
    y = q(x)
    scale, zp = q.qparams()
    assert 0 < zp < 255 and torch.isclose(scale, torch.tensor(4.0 / 255))
    codes = y / scale + zp
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
    assert torch.all(q.eval()(torch.zeros(3)) == 0)  # zero (padding, ReLU floor) is exact
    q.train()
    q(x * 3)  # EMA: halfway towards the new range
    assert torch.isclose(q.max_val, torch.tensor(6.0)) and torch.isclose(q.min_val, torch.tensor(-2.0))
    qat.freeze_observers(q)
    q(x * 100)
    assert torch.isclose(q.max_val, torch.tensor(6.0))


def test_fake_quant_passes_gradients_straight_through():
    conv = qat.QuantConv2d.from_float(torch.nn.Conv2d(2, 4, 3))
    act = qat.ActQuant().train()
    x = torch.randn(3, 2, 5, 5, requires_grad=True)
    act(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # in range: identity gradient
    conv(torch.randn(3, 2, 5, 5)).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_unquantized_eval_is_an_error_not_silent_float():
    q = qat.prepare_qat(build_model(SPECS["toy"]).eval(), torch.randn(1, 1, 8, 8))
    with pytest.raises(RuntimeError, match="calibrate"):
        q.eval()(torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("arch", list(SPECS))
def test_quantizers_placed_around_every_conv_and_add(arch):
    x = torch.randn(8, 1, 8, 8)
    q = qat.prepare_qat(_with_bn_stats(SPECS[arch]), x[:1])
    modules = dict(q.named_modules())
    for node in q.graph.nodes:
        kind = qat._kind(node, modules)
        if kind == "compute":
            assert qat._grid_source(node.args[0], modules) is not None, node.name
        if kind in ("compute", "add"):
            after = next(iter(node.users))
            if qat._kind(after, modules) == "relu" and len(node.users) == 1:
                after = next(iter(after.users))
            assert qat._kind(after, modules) == "quant", node.name
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in modules.values())
    assert convs == sum(isinstance(m, qat.QuantConv2d) for m in modules.values()) > 0


def test_masks_stay_fixed_through_qat_training():
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    pruned = pruning.prune_unstructured(_with_bn_stats(SPECS["resnet18"]), 0.5)
    masks = pruning.masks(pruned)
    q = qat.prepare_qat(pruned, x[:1], masks=masks)
    qat.calibrate(q, x)
    fit(q, (x, y), (x, y), FitConfig(epochs=1, lr=0.05, batch_size=16))
    params = dict(q.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0), name
    assert pruning.masks(q).keys() == masks.keys()  # the mask is recoverable from the zeros after a reload
    assert all(torch.equal(pruning.masks(q)[k], masks[k]) for k in masks)
    with pytest.raises(ValueError, match="lacks"):
        qat.prepare_qat(pruned, x[:1], masks={"nope.weight": masks["fc.weight"]})


def test_qat_checkpoint_round_trips_with_weights_only_on_a_channel_pruned_model():
    x = torch.randn(16, 1, 8, 8)
    spec = SPECS["resnet18"]
    pruned = pruning.prune_structured(_with_bn_stats(spec), 0.5, x[:1])
    q = qat.calibrate(qat.prepare_qat(pruned, x[:1]), x).eval()
    buf = io.BytesIO()
    torch.save({"spec": spec, "shapes": pruning.shapes_of(pruned), "state_dict": q.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh = pruning.rebuild_pruned(build_model(ckpt["spec"]), ckpt["shapes"])
    rebuilt = qat.prepare_qat(fresh, x[:1])
    rebuilt.load_state_dict(ckpt["state_dict"])
    torch.testing.assert_close(rebuilt.eval()(x), q(x))


def test_qat_keeps_accuracy(trained_qat, digits):
    fp32, q = trained_qat
    _, _, xte, yte = digits
    assert accuracy(q, xte, yte) > accuracy(fp32, xte, yte) - 0.03
    assert accuracy(q, xte, yte) > 0.8


def test_int8_onnx_stores_int8_weights_and_int32_biases(int8_onnx):
    graph = onnx.load(str(int8_onnx)).graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    compute = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert [n.op_type for n in compute] == ["Conv", "Conv", "Gemm"]
    for node in compute:
        w_dq, b_dq = producer[node.input[1]], producer[node.input[2]]
        assert w_dq.op_type == b_dq.op_type == "DequantizeLinear"
        assert inits[w_dq.input[0]].data_type == onnx.TensorProto.INT8
        assert numpy_helper.to_array(inits[w_dq.input[1]]).shape == (inits[w_dq.input[0]].dims[0],)  # per channel
        assert inits[b_dq.input[0]].data_type == onnx.TensorProto.INT32
        act_dq = producer[node.input[0]]
        assert act_dq.op_type == "DequantizeLinear" and producer[act_dq.input[0]].op_type == "QuantizeLinear"
        assert inits[act_dq.input[2]].data_type == onnx.TensorProto.UINT8
    assert not [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2]
    assert len(qat.int8_initializers(int8_onnx)) == 3


def test_int8_onnx_matches_fake_quant_and_ort_fuses_it(trained_qat, int8_onnx, digits, tmp_path):
    _, q = trained_qat
    _, _, xte, _ = digits
    with torch.no_grad():
        expected = q(xte).argmax(1).numpy()
    got = run_onnx(int8_onnx, xte.numpy()).argmax(1)
    assert (got == expected).mean() >= 0.99
    ops = _ort_optimized_ops(int8_onnx, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0 and ops["QGemm"] == 1


@pytest.mark.parametrize("arch", ["resnet18", "vgg16_bn"])
def test_every_conv_becomes_qlinearconv(arch, tmp_path):
    x = torch.rand(32, 1, 8, 8)
    model = _with_bn_stats(SPECS[arch])
    q = qat.calibrate(qat.prepare_qat(model, x[:1]), x).eval()
    path = qat.export_int8_onnx(q, x[:1], tmp_path / "m.onnx")
    ops = _ort_optimized_ops(path, tmp_path)
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert ops["QLinearConv"] == n_convs and ops["Conv"] == 0
    if arch == "resnet18":
        assert ops["QLinearAdd"] == 8 and ops["Add"] == 0
        # its mean pooling exports as ReduceMean; rewritten as GlobalAveragePool it runs as one INT8 kernel
        assert ops["QLinearGlobalAveragePool"] == 1 and ops["ReduceMean"] == 0
    with torch.no_grad():
        deployed = qat.to_deploy(q)(x).numpy()
    np.testing.assert_allclose(run_onnx(path, x.numpy()), deployed, atol=0.05)


def test_a_channel_with_zero_weights_keeps_its_bias_in_int8():
    x = torch.rand(16, 1, 8, 8)
    model = _with_bn_stats(SPECS["toy"])
    with torch.no_grad():
        model.conv1.weight[0] = 0  # after folding, this channel is its bias alone (a pruned channel)
        model.bn1.bias[0] = 1.0
        model.conv2.weight[:, 0] *= 10  # and let the next layer depend on it
    q = qat.calibrate(qat.prepare_qat(model, x[:1]), x).eval()
    assert q.conv1.bias[0] > 0.5
    deployed = qat.to_deploy(q)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), q(x), atol=2 * float(q.act_quant.fc.qparams()[0]), rtol=0)
