"""INT8 quantization-aware training, written for what ONNX Runtime runs fast on a CPU.

The format is the one ORT fuses into QLinearConv / QLinearAdd / QGemm kernels: weights INT8,
symmetric, per output channel (zero point 0, range [-127, 127]); activations UINT8, affine, per
tensor. Signed INT8 activations measured slower than FP32 here, so they are not offered.

`prepare_qat` folds BatchNorm into the preceding conv, traces the model with torch.fx and places
fake-quantizers generically: on the model input; on the output of every conv / linear / add
(after its ReLU when a ReLU is the only consumer, so conv+relu and add+relu stay fused); and on
the input of every conv / linear whose input is not already on a quantization grid. Max-pool,
flatten and reshape keep the grid; average pooling and non-foldable BatchNorm run in float.
Gradients flow through the rounding by the straight-through estimator of `torch.fake_quantize_*`.

`export_int8_onnx` turns the trained model into a real INT8 ONNX graph: INT8 weight and INT32
bias initialisers feeding DequantizeLinear, UINT8 QuantizeLinear/DequantizeLinear pairs on the
activations, written by the dynamo exporter from `quantized_decomposed` ops.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops before export)
from torch.nn.utils.fusion import fuse_conv_bn_weights

from distillery.core.artifacts import atomic_path
from distillery.onnx_export import quiet_export, run_onnx
from distillery.training import FitConfig, fit

W_QMIN, W_QMAX = -127, 127  # symmetric INT8 weights: zero point 0, -128 unused
A_QMIN, A_QMAX = 0, 255  # affine UINT8 activations
EPS = 1e-8


# ---------------------------------------------------------------- BatchNorm folding

def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """A traced copy of `model` with every BatchNorm2d that directly follows a conv folded into it.

    A BN whose input is not a conv used only by it (pre-activation BN in WRN) is left as it is.
    Module names are kept, so parameter names (and pruning masks) still match the original.
    """
    was_training = model.training
    gm = fx.symbolic_trace(copy.deepcopy(model).eval())
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        conv_node = node.args[0]
        if not (isinstance(conv_node, fx.Node) and conv_node.op == "call_module"
                and isinstance(modules[conv_node.target], nn.Conv2d) and len(conv_node.users) == 1
                and calls[conv_node.target] == 1 and calls[node.target] == 1):
            continue
        conv, bn = modules[conv_node.target], modules[node.target]
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                      bn.eps, bn.weight, bn.bias)
        node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
    gm.graph.lint()
    gm.recompile()
    return gm.train(was_training)


# ---------------------------------------------------------------- fake-quant modules

@dataclass(frozen=True)
class QATConfig:
    ema_momentum: float = 0.01  # weight of each new batch in the activation min/max averages


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric scale: max|w| / 127."""
    return (w.detach().abs().amax(dim=tuple(range(1, w.dim()))) / W_QMAX).clamp(min=EPS)


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, weight_scale(w), zero, 0, W_QMIN, W_QMAX)


class ActQuant(nn.Module):
    """Per-tensor affine UINT8 fake-quant with an EMA min/max observer (observes in training mode)."""

    def __init__(self, momentum: float = 0.01):
        super().__init__()
        self.momentum = momentum
        self.observing = True  # training updates the range; `freeze_observers` turns this off
        self.calibrating = False  # plain running min/max, no fake-quant (see `calibrate`)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def initialised(self) -> bool:
        return bool(torch.isfinite(self.min_val))

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point); the range always holds 0 so that zero (padding, ReLU) is exact."""
        lo, hi = self.min_val.clamp(max=0.0), self.max_val.clamp(min=0.0)
        scale = ((hi - lo) / (A_QMAX - A_QMIN)).clamp(min=EPS)
        zero_point = (A_QMIN - torch.round(lo / scale)).clamp(A_QMIN, A_QMAX).to(torch.int32)
        return scale, zero_point

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min(), x.detach().max()
        if self.calibrating or not self.initialised():
            self.min_val.copy_(torch.minimum(self.min_val, lo))
            self.max_val.copy_(torch.maximum(self.max_val, hi))
        else:
            self.min_val.lerp_(lo, self.momentum)
            self.max_val.lerp_(hi, self.momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating or (self.training and self.observing):
            self._observe(x)
        if self.calibrating:
            return x
        if not self.initialised():
            raise RuntimeError("activation quantizer has no range yet: run `calibrate` or train before evaluating")
        scale, zero_point = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, A_QMIN, A_QMAX)

    def extra_repr(self) -> str:
        return f"min={self.min_val.item():.4g}, max={self.max_val.item():.4g}"


class _MaskedWeight:
    """Pruning masks held as non-persistent buffers: masked weights get zero gradient and stay 0."""

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self.register_buffer("weight_mask", None if mask is None else mask.to(torch.bool), persistent=False)
        if mask is not None:
            with torch.no_grad():
                self.weight.mul_(self.weight_mask)

    def effective_weight(self) -> torch.Tensor:
        return self.weight if self.weight_mask is None else self.weight * self.weight_mask


class QuantConv2d(nn.Conv2d, _MaskedWeight):
    """Conv2d whose weight is fake-quantized per output channel; activations are quantized outside."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None) -> "QuantConv2d":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device="meta")  # meta: no wasted init
        q.weight, q.bias = conv.weight, conv.bias
        q.set_mask(mask)
        return q.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, fake_quant_weight(self.effective_weight()), self.bias)


class QuantLinear(nn.Linear, _MaskedWeight):
    """Linear whose weight is fake-quantized per output channel."""

    @classmethod
    def from_float(cls, linear: nn.Linear, mask: torch.Tensor | None = None) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        q.weight, q.bias = linear.weight, linear.bias
        q.set_mask(mask)
        return q.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quant_weight(self.effective_weight()), self.bias)


# ---------------------------------------------------------------- graph patterns

RELU_FUNCS = {F.relu, torch.relu}
ADD_FUNCS = {operator.add, operator.iadd, torch.add}
SAME_GRID_FUNCS = {torch.flatten, torch.reshape, F.max_pool2d}  # outputs stay on the input's quantization grid
SAME_GRID_METHODS = {"flatten", "view", "reshape"}
SAME_GRID_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)


def _kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "placeholder":
        return "input"
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, ActQuant):
            return "quant"
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return "compute"
        if isinstance(m, nn.ReLU):
            return "relu"
        if isinstance(m, SAME_GRID_MODULES):
            return "same_grid"
    elif node.op == "call_function":
        if node.target in RELU_FUNCS:
            return "relu"
        if node.target in ADD_FUNCS and all(isinstance(a, fx.Node) for a in node.args[:2]):
            return "add"
        if node.target in SAME_GRID_FUNCS:
            return "same_grid"
    elif node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return "relu"
        if node.target in ("add", "add_") and all(isinstance(a, fx.Node) for a in node.args[:2]):
            return "add"
        if node.target in SAME_GRID_METHODS:
            return "same_grid"
    return None


def _grid_source(node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The ActQuant node whose grid `node` lies on (through grid-keeping ops), else None."""
    while isinstance(node, fx.Node):
        kind = _kind(node, modules)
        if kind == "quant":
            return node
        if kind != "same_grid":
            return None
        node = node.args[0]
    return None


def _insert_quant(gm: fx.GraphModule, after: fx.Node, name: str, cfg: QATConfig,
                  only_user: fx.Node | None = None) -> fx.Node:
    target = f"act_quant.{name}"
    gm.add_submodule(target, ActQuant(cfg.ema_momentum))
    with gm.graph.inserting_after(after):
        q = gm.graph.call_module(target, (after,))
    if only_user is None:
        after.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
    else:
        only_user.replace_input_with(after, q)
    return q


def prepare_qat(model: nn.Module, example_inputs: torch.Tensor, masks: dict[str, torch.Tensor] | None = None,
                cfg: QATConfig = QATConfig()) -> fx.GraphModule:
    """A fake-quantized copy of `model` (BN folded) ready for training; run `calibrate` before the first epoch.

    `masks` (`pruning.masks(model)`) pin pruned weights at zero for all of training. The result is
    rebuilt the same way for a checkpoint: `prepare_qat(fresh_model, ...).load_state_dict(sd)`.
    """
    gm = fold_batchnorm(model)
    masks = masks or {}
    unknown = set(masks) - {n for n, _ in gm.named_parameters()}
    if unknown:
        raise ValueError(f"masks name parameters the model lacks: {sorted(unknown)[:5]}")
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], (nn.Conv2d, nn.Linear)):
            float_mod = modules[node.target]
            qcls = QuantConv2d if isinstance(float_mod, nn.Conv2d) else QuantLinear
            parent, _, attr = node.target.rpartition(".")
            setattr(gm.get_submodule(parent), attr, qcls.from_float(float_mod, masks.get(f"{node.target}.weight")))
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        kind = _kind(node, modules)
        if kind == "input":
            _insert_quant(gm, node, node.name, cfg)
        elif kind in ("compute", "add"):
            users = list(node.users)
            if len(users) == 1 and _kind(users[0], modules) == "relu":
                node = users[0]
            _insert_quant(gm, node, node.name, cfg)
        modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if _kind(node, modules) == "compute" and _grid_source(node.args[0], modules) is None:
            _insert_quant(gm, node.args[0], f"{node.name}_input", cfg, only_user=node)
            modules = dict(gm.named_modules())
    gm.graph.lint()
    gm.recompile()
    with torch.no_grad():  # fail here, not in the training loop, if the graph came out wrong
        calibrate(copy.deepcopy(gm), example_inputs)
    return gm.train(model.training)


def act_quantizers(model: nn.Module) -> list[ActQuant]:
    return [m for m in model.modules() if isinstance(m, ActQuant)]


@torch.no_grad()
def calibrate(qat_model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """Set every activation range to the min/max seen over `x` (float activations), in place."""
    was_training = qat_model.training
    qat_model.eval()
    quants = act_quantizers(qat_model)
    for q in quants:
        q.min_val.fill_(float("inf"))
        q.max_val.fill_(float("-inf"))
        q.calibrating = True
    try:
        for i in range(0, len(x), batch_size):
            qat_model(torch.as_tensor(x[i:i + batch_size]))
    finally:
        for q in quants:
            q.calibrating = False
    return qat_model.train(was_training)


def freeze_observers(qat_model: nn.Module, frozen: bool = True) -> None:
    """Stop (or restart) updating activation ranges in training; usual for the last epochs."""
    for q in act_quantizers(qat_model):
        q.observing = not frozen


# ---------------------------------------------------------------- deployment form and ONNX export

def is_quantized(model: nn.Module) -> bool:
    """Whether `model` holds fake-quantized layers (it went through `prepare_qat`)."""
    return any(isinstance(m, (QuantConv2d, QuantLinear)) for m in model.modules())


def quantize_aware_train(model: nn.Module, mask: dict | None, train: tuple, val: tuple, calib_x, example: torch.Tensor,
                         cfg: FitConfig, freeze_observers_epoch: int, state: dict | None = None,
                         on_epoch=None) -> fx.GraphModule:
    """The Q step: fold BN, insert fake-quant, calibrate ranges on `calib_x`, then train with the masks fixed.

    Activation ranges follow the data until epoch `freeze_observers_epoch`, then stay put; the
    returned model has them frozen for good (a later training step must not move the deployed grid).
    """
    qmodel = prepare_qat(model, example, mask or None)
    calibrate(qmodel, torch.as_tensor(calib_x))
    done = len(state["history"]) if state is not None else 0
    if done >= freeze_observers_epoch:
        freeze_observers(qmodel)

    def freeze_when_due(epoch: int, m: nn.Module, resume_state: dict, hist) -> None:
        if epoch + 1 >= freeze_observers_epoch:
            freeze_observers(m)
        if on_epoch is not None:
            on_epoch(epoch, m, resume_state, hist)
    if cfg.epochs:
        fit(qmodel, train, val, cfg, on_epoch=freeze_when_due, state=state, desc="QAT int8")
    freeze_observers(qmodel)
    return qmodel


class QDQ(nn.Module):
    """UINT8 QuantizeLinear -> DequantizeLinear with fixed parameters (an activation in the deployed graph)."""

    def __init__(self, scale: float, zero_point: int):
        super().__init__()
        self.scale, self.zero_point = scale, zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        q = ops.quantize_per_tensor(x, self.scale, self.zero_point, A_QMIN, A_QMAX, torch.uint8)
        return ops.dequantize_per_tensor(q, self.scale, self.zero_point, A_QMIN, A_QMAX, torch.uint8)


class _Int8Weights(nn.Module):
    """INT8 weight and INT32 bias buffers, dequantized per channel in the graph."""

    def _store(self, weight: torch.Tensor, bias: torch.Tensor | None, input_scale: float) -> None:
        bias = torch.zeros(weight.shape[0]) if bias is None else bias.detach()
        # A channel with (near-)zero weights would get a bias scale so small that its bias overflows INT32:
        # widen such a channel's scale until the bias fits (its weight codes are ~0 either way).
        scale = torch.maximum(weight_scale(weight), bias.abs() / (input_scale * (2 ** 31 - 1)) * 1.01)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        q = torch.round(weight.detach() / scale.view(shape)).clamp(W_QMIN, W_QMAX).to(torch.int8)
        bias_scale = scale * input_scale
        bias_q = torch.round(bias.double() / bias_scale.double()).clamp(-2 ** 31, 2 ** 31 - 1).to(torch.int32)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale.float())
        # explicit zero points: without them ORT leaves the classifier as DequantizeLinear + float Gemm, not QGemm
        self.register_buffer("weight_zero_point", torch.zeros(len(scale), dtype=torch.int32))
        self.register_buffer("bias_int32", bias_q)
        self.register_buffer("bias_scale", bias_scale.float())

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        ops = torch.ops.quantized_decomposed
        w = ops.dequantize_per_channel(self.weight_int8, self.weight_scale, self.weight_zero_point, 0,
                                       W_QMIN, W_QMAX, torch.int8)
        b = ops.dequantize_per_channel(self.bias_int32, self.bias_scale, None, 0, -2 ** 31, 2 ** 31 - 1, torch.int32)
        return w, b


class Int8Conv2d(_Int8Weights):
    def __init__(self, conv: QuantConv2d, input_scale: float):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not exportable as QLinearConv")
        self._store(conv.effective_weight(), conv.bias, input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._weights()
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


class Int8Linear(_Int8Weights):
    def __init__(self, linear: QuantLinear, input_scale: float):
        super().__init__()
        self._store(linear.effective_weight(), linear.bias, input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._weights()
        return F.linear(x, w, b)


def to_deploy(qat_model: fx.GraphModule) -> fx.GraphModule:
    """The deployed form of a trained QAT model: INT8 weights, INT32 biases, UINT8 Q/DQ activations.

    Its outputs are what the INT8 ONNX computes; they match the fake-quant model up to rounding.
    """
    gm = copy.deepcopy(qat_model).eval()
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = modules[node.target]
        parent, _, attr = node.target.rpartition(".")
        if isinstance(m, ActQuant):
            if not m.initialised():
                raise RuntimeError(f"{node.target}: no activation range; calibrate or train the QAT model first")
            scale, zero_point = m.qparams()
            new = QDQ(float(scale), int(zero_point))
        elif isinstance(m, (QuantConv2d, QuantLinear)):
            source = _grid_source(node.args[0], modules)
            if source is None:
                raise RuntimeError(f"{node.target}: input is not quantized; was the model made by prepare_qat?")
            input_scale = float(modules[source.target].qparams()[0])
            new = Int8Conv2d(m, input_scale) if isinstance(m, QuantConv2d) else Int8Linear(m, input_scale)
        else:
            continue
        setattr(gm.get_submodule(parent), attr, new)
    # Grid-keeping ops (max-pool) get a Q/DQ with their input's parameters: exact, and lets ORT run them in UINT8.
    for node in list(gm.graph.nodes):
        if _kind(node, modules) == "same_grid" and not isinstance(modules.get(node.target), (nn.Identity, nn.Dropout)):
            source = _grid_source(node, modules)
            if source is not None and not all(_kind(u, modules) == "same_grid" for u in node.users):
                qdq = gm.get_submodule(source.target)
                target = f"act_quant.{node.name}_requant"
                gm.add_submodule(target, QDQ(qdq.scale, qdq.zero_point))
                with gm.graph.inserting_after(node):
                    q = gm.graph.call_module(target, (node,))
                node.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
    gm.graph.lint()
    gm.recompile()
    return gm


def export_int8_onnx(qat_model: fx.GraphModule, example_inputs: torch.Tensor, path: Path | str,
                     opset: int = 18) -> Path:
    """Write the INT8 ONNX of a trained QAT model to `path`, checked against its deployed form in ORT.

    The batch size is that of `example_inputs`, as for the FP32 export. The exporter's optimiser
    runs after translation: it folds the scale casts but leaves DequantizeLinear(INT8) alone,
    which the check below makes sure of.
    """
    deploy = to_deploy(qat_model)
    n_weights = sum(isinstance(m, _Int8Weights) for m in deploy.modules())
    with atomic_path(path) as tmp:
        with quiet_export():
            program = torch.onnx.export(deploy, (example_inputs,), dynamo=True, opset_version=opset,
                                        input_names=["input"], output_names=["output"], optimize=False)
            program.optimize()
        program.save(str(tmp))
        onnx.checker.check_model(str(tmp))
        if len(int8_initializers(tmp)) != n_weights:
            raise RuntimeError(f"{path}: {len(int8_initializers(tmp))} INT8 weight initialisers for {n_weights} "
                               "quantized layers; the exporter folded weights back to float")
        with torch.no_grad():
            expected = deploy(example_inputs).numpy()
        err = np.abs(run_onnx(tmp, example_inputs.numpy()) - expected).max()
        if err > 0.1 * (np.abs(expected).max() + 1e-6):  # rounding moves a few output steps; a broken graph far more
            raise RuntimeError(f"{path}: ORT output differs from the deployed torch model by {err:.3g}")
    return Path(path)


def int8_initializers(onnx_path: Path | str) -> list[str]:
    """Names of the INT8 weight initialisers (INT8 data dequantized by DequantizeLinear) in an ONNX file."""
    graph = onnx.load(str(onnx_path)).graph
    int8 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    return [n.input[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8]
