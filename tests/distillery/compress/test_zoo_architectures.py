"""Every compression step on real-world architectures, built by the zoos' own definitions.

An MLP of Linear layers (a user's class, on flattened images), torchvision's resnet18 and timm's
resnet10t, MobileNetV3-small from both zoos (depthwise convs, hard-swish, squeeze-and-excitation)
and a two-block timm ViT (attention, LayerNorm, GELU, Linear on tokens): random weights, 32x32
images, a few steps each. Skipped where torchvision or timm is not installed (both are dev extras).
"""
import collections
import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from distillery.compress import kd, pruning, qat
from distillery.core.errors import DistilleryError
from distillery.models import factory
from distillery.onnx_export import export_fp32_onnx, onnx_stats, run_onnx
from distillery.training import FitConfig, fit

if importlib.util.find_spec("torchvision") is None or importlib.util.find_spec("timm") is None:
    pytest.skip("torchvision and timm (dev extras) are needed for the zoo models", allow_module_level=True)

# Torch-Pruning notes the ViT's cls_token / pos_embed; they hold the embedding width, which stays whole
pytestmark = pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")

# PyPI's torchvision is a CUDA build; beside the CPU torch its detection ops do not load (see the factory loader)
torchvision, timm = factory.import_module("torchvision"), factory.import_module("timm")

CLASSES = 3


class MLP(nn.Module):
    """A user-style classifier on flattened images, with both norms structured pruning must resize."""

    def __init__(self, in_features: int = 3 * 32 * 32, hidden: int = 64, num_classes: int = CLASSES):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden)
        self.fc2, self.norm2 = nn.Linear(hidden, hidden // 2), nn.LayerNorm(hidden // 2)
        self.head = nn.Linear(hidden // 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.fc1(x.flatten(1))))
        return self.head(torch.relu(self.norm2(self.fc2(x))))


ZOO = {
    "mlp": MLP,
    "torchvision_resnet18": lambda: torchvision.models.resnet18(num_classes=CLASSES),
    "timm_resnet10t": lambda: timm.create_model("resnet10t", num_classes=CLASSES),
    "torchvision_mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=CLASSES),
    "timm_mobilenetv3_small_050": lambda: timm.create_model("mobilenetv3_small_050", num_classes=CLASSES),
    "timm_vit": lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2,
                                          num_heads=2, num_classes=CLASSES),
}
ARCHS = list(ZOO)
STEP = FitConfig(epochs=1, lr=0.01, batch_size=4, optimizer="adam", augment=False)  # two optimiser steps


def build(arch: str) -> nn.Module:
    """The model with random weights and the BatchNorm statistics of one random batch, in eval mode.

    Fresh statistics (mean 0, variance 1) do not match the activations; in MobileNetV3 they shrink
    the logits to 1e-10, which no quantization grid resolves.
    """
    torch.manual_seed(0)
    model = ZOO[arch]()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None  # cumulative average: this batch's statistics
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 32, 32))
    for m in norms:
        m.momentum = 0.1
    return model.eval()


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=gen)
    return x, torch.randint(0, CLASSES, (8,), generator=gen)


def _calibrated_qat(arch: str, x: torch.Tensor) -> tuple[nn.Module, torch.fx.GraphModule]:
    model = build(arch)
    q = qat.prepare_qat(model, x[:1])
    qat.calibrate(q, x)
    return model, q


@pytest.fixture(scope="module")
def trained_qat(data):
    """Per architecture: the FP32 model and its QAT form, calibrated and trained for two steps."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            model, q = _calibrated_qat(arch, data[0])
            fit(q, data, data, STEP)
            qat.freeze_observers(q)
            cache[arch] = model, q.eval()
        return cache[arch]
    return get


def _int8_compute_ops(path, tmp_path) -> int:
    """Conv / Gemm / MatMul nodes that ONNX Runtime runs on integer kernels after its graph optimisation."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    return sum(ops[k] for k in ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger"))


@pytest.mark.parametrize("arch", ARCHS)
def test_unstructured_pruning_reaches_its_sparsity_and_fine_tuning_keeps_the_zeros(arch, data):
    model = build(arch)
    pruned, mask = pruning.prune(model, "unstructured", 0.6, data[0][:1])
    assert pruning.sparsity(pruned) >= 0.6 - 1e-3
    before = {k: v.detach().clone() for k, v in pruned.named_parameters()}
    pruning.finetune_pruned(pruned, mask, data, data, STEP)
    params = dict(pruned.named_parameters())
    for name, keep in mask.items():
        assert not params[name][~keep].any(), name
    assert any(not torch.equal(before[k][mask[k]], params[k][mask[k]]) for k in mask)  # the kept weights trained
    assert pruning.sparsity(pruned) >= 0.6 - 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_structured_pruning_shrinks_the_model_keeps_its_classes_and_rebuilds_from_a_state_dict(arch, data):
    x = data[0][:2]
    model = build(arch)
    pruned, mask = pruning.prune(model, "structured", 0.5, x[:1])
    assert mask is None
    assert pruning.count_params(pruned) < 0.85 * pruning.count_params(model)
    assert pruning.count_macs(pruned, x[:1]) < 0.85 * pruning.count_macs(model, x[:1])
    with torch.no_grad():
        out = pruned.eval()(x)
    assert out.shape == (2, CLASSES) and torch.isfinite(out).all()
    for source in (pruned.state_dict(), pruning.shapes_of(pruned)):
        rebuilt = pruning.rebuild_pruned(build(arch), source)
        rebuilt.load_state_dict(pruned.state_dict())
        assert pruning.shapes_of(rebuilt) == pruning.shapes_of(pruned)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt.eval()(x), out)


def test_structured_pruning_keeps_attention_heads_and_prunes_the_mlp_widths(data):
    vit = build("timm_vit")
    pruned, _ = pruning.prune(vit, "structured", 0.5, data[0][:1])
    for block in pruned.blocks:
        assert (block.attn.qkv.out_features, block.attn.proj.in_features) == (3 * 48, 48)
        assert block.mlp.fc1.out_features == block.mlp.fc2.in_features == 96  # 192 halved


def _batchnorms(gm: torch.fx.GraphModule) -> int:
    """BatchNorm2d leaves and F.batch_norm calls (timm's BatchNormAct2d is traced through) in a graph."""
    modules = dict(gm.named_modules())
    return sum(n.op == "call_module" and isinstance(modules[n.target], nn.BatchNorm2d)
               or n.op == "call_function" and n.target is F.batch_norm for n in gm.graph.nodes)


@pytest.mark.parametrize("arch", ARCHS)
def test_batchnorm_folds_into_every_conv_without_changing_the_outputs(arch, data):
    model = build(arch)
    folded = qat.fold_batchnorm(model)
    bns = {name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert _batchnorms(qat.trace(model)) == len(bns) and _batchnorms(folded) == 0
    assert not [k for k in folded.state_dict() if k.rpartition(".")[0] in bns]  # no stale BN tensors left behind
    with torch.no_grad():
        expected = model(data[0])
        assert (folded(data[0]) - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_qat_quantizes_every_layer_and_trains(arch, data):
    model, q = _calibrated_qat(arch, data[0])
    floats = [n for n, m in q.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert not floats, f"layers left in float: {floats[:5]}"
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert sum(isinstance(m, (qat.QuantConv2d, qat.QuantLinear)) for m in q.modules()) == n_layers
    before = {k: v.detach().clone() for k, v in q.named_parameters()}
    hist = fit(q, data, data, STEP)
    assert np.isfinite(hist.epochs[0]["train_loss"])
    assert any(not torch.equal(before[k], v) for k, v in q.named_parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_kd_trains_a_qat_student_on_a_fixed_grid(arch, data, trained_qat):
    teacher, student = trained_qat(arch)
    ranges = [(a.min_val.clone(), a.max_val.clone()) for a in qat.act_quantizers(student)]
    distilled, record = kd.distill(student, teacher, data, data, STEP, temperature=4.0, alpha=0.5)
    assert 0.0 <= record["val_acc_best"] <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), distilled.parameters()))
    assert all(torch.equal(q.min_val, lo) and torch.equal(q.max_val, hi)
               for q, (lo, hi) in zip(qat.act_quantizers(distilled), ranges))


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_and_fp32_onnx_run_in_ort_and_report_their_int8_share(arch, data, trained_qat, tmp_path):
    model, q = trained_qat(arch)
    x = data[0][:4]
    path = qat.export_int8_onnx(q, x[:1], tmp_path / f"{arch}.int8.onnx")
    n_layers = sum(isinstance(m, (qat.QuantConv2d, qat.QuantLinear)) for m in q.modules())
    assert len(qat.int8_initializers(path)) == n_layers
    assert _int8_compute_ops(path, tmp_path) == n_layers  # ORT fuses every quantized layer into an integer kernel
    with torch.no_grad():
        expected = qat.to_deploy(q)(x).numpy()
    got = run_onnx(path, x.numpy())
    assert np.abs(got - expected).max() <= 0.1 * np.abs(expected).max()  # integer kernels round a few steps apart
    assert (got.argmax(1) == expected.argmax(1)).all()
    int8 = onnx_stats(path)

    fp32_path = export_fp32_onnx(model, (x[:1],), tmp_path / f"{arch}.onnx")
    fp32 = onnx_stats(fp32_path)
    assert fp32["int8_macs"] == 0 and fp32["int8_mac_share"] == 0.0
    assert int8["macs"] == fp32["macs"] > 0
    # attention's activation-by-activation MatMuls stay FP32 in the ViT (5 % of its MACs); nothing else does
    assert int8["int8_mac_share"] >= (0.9 if arch == "timm_vit" else 0.999)


class _FixedReshape(nn.Module):
    """Reads its channel count from a constant: channel pruning leaves it inconsistent."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).reshape(len(x), 16, -1).mean(-1))


class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x  # data-dependent control flow: not traceable by torch.fx


def test_what_cannot_be_compressed_is_one_clear_error_naming_the_layer_and_the_way_out():
    with pytest.raises(DistilleryError, match=r"_FixedReshape no longer runs after channel pruning .* unstructured"):
        pruning.prune_structured(_FixedReshape(), 0.5, torch.randn(1, 3, 8, 8))
    gated = nn.Sequential(nn.Conv2d(3, 4, 3), _Gate(), nn.Flatten(), nn.LazyLinear(CLASSES))
    gated(torch.randn(1, 3, 8, 8))
    with pytest.raises(DistilleryError, match=r"cannot trace layer '1' \(_Gate\) of Sequential: .*control flow"):
        qat.prepare_qat(gated, torch.randn(1, 3, 8, 8))
