"""INT8 quantization-aware training, written for what ONNX Runtime runs fast on a CPU.

The format is the one ORT fuses into QLinearConv / QLinearAdd / QGemm kernels: weights INT8,
symmetric, per output channel (zero point 0, range [-127, 127]); activations UINT8, affine, per
tensor. Signed INT8 activations measured slower than FP32 here, so they are not offered.

`prepare_qat` folds BatchNorm into the preceding conv, traces the model with torch.fx and places
fake-quantizers generically: on the model input; on the output of every conv / linear / add
(after its ReLU or ReLU6 when that is the only consumer, so conv+relu and add+relu stay fused); and
on the input of every conv / linear whose input is not already on a quantization grid. Max-pool,
flatten and reshape keep the grid; everything else runs in float between a DequantizeLinear and a
QuantizeLinear: pooling, non-foldable BatchNorm, hard-swish / GELU, squeeze-and-excitation gates,
softmax and attention's activation-by-activation matmuls. A transformer's residual stream (an add
that feeds a LayerNorm) stays float too: its outlier channels would take the whole UINT8 range.
Gradients flow through the rounding by the straight-through estimator of `torch.fake_quantize_*`.
Zoo models (torchvision, timm) trace as they are; see `trace`.

`export_int8_onnx` turns the trained model into a real INT8 ONNX graph: INT8 weight and INT32
bias initialisers feeding DequantizeLinear, UINT8 QuantizeLinear/DequantizeLinear pairs on the
activations, written by the dynamo exporter from `quantized_decomposed` ops.
"""
from __future__ import annotations

import copy
import inspect
import operator
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops before export)
from torch.nn.utils.fusion import fuse_conv_bn_weights

from distillery.core.artifacts import atomic_path
from distillery.core.errors import DistilleryError
from distillery.onnx_export import check_batches, export_program, pool_as_global_average, quiet_export
from distillery.training import FitConfig, fit

W_QMIN, W_QMAX = -127, 127  # symmetric INT8 weights: zero point 0, -128 unused
A_QMIN, A_QMAX = 0, 255  # affine UINT8 activations
EPS = 1e-8


# ---------------------------------------------------------------- tracing and BatchNorm folding

def _plain_layer(m: nn.Conv2d | nn.Linear) -> bool:
    """Whether a Conv2d / Linear subclass computes exactly its base layer (timm's `Linear` does; `Conv2dSame` not)."""
    base = nn.Conv2d if isinstance(m, nn.Conv2d) else nn.Linear
    if type(m).forward is base.forward:
        return True
    try:
        graph = fx.Tracer().trace(m)
    except Exception:
        return False
    calls = [n for n in graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    if len(calls) != 1 or calls[0].kwargs or not (calls[0].args and getattr(calls[0].args[0], "op", "") == "placeholder"):
        return False
    call = calls[0]
    params = [a.target if isinstance(a, fx.Node) and a.op == "get_attr" else a for a in call.args[1:3]]
    if params != ["weight", None if m.bias is None else "bias"]:
        return False
    if isinstance(m, nn.Conv2d):
        return (call.target is torch.conv2d and m.padding_mode == "zeros"
                and tuple(call.args[3:]) == (m.stride, m.padding, m.dilation, m.groups))
    return call.target is torch._C._nn.linear


class _Tracer(fx.Tracer):
    """fx's tracer, keeping Conv2d / Linear subclasses that are plain layers as leaves, like torch.nn's own."""

    def __init__(self, model: nn.Module):
        super().__init__()
        # decided before tracing: probing a layer while tracing would record its attribute reads in the graph
        self.plain = {id(m) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and _plain_layer(m)}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) or id(m) in self.plain


def trace(model: nn.Module) -> fx.GraphModule:
    """The torch.fx graph of `model` called on one tensor; other `forward` arguments are fixed at their defaults.

    Zoo models take optional extras (timm's ViT: `attn_mask=None, is_causal=False`); fixing them
    keeps their `if` branches out of the graph and leaves the image as the only input.
    """
    extra = list(inspect.signature(model.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in extra if p.default is not inspect.Parameter.empty}
    tracer = _Tracer(model)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as err:
        where = next(reversed(tracer.module_stack.values()), ("", type(model)))
        layer = f"layer {where[0]!r} ({where[1].__name__})" if where[0] else type(model).__name__
        raise DistilleryError(f"torch.fx cannot trace {layer} of {type(model).__name__}: {str(err).splitlines()[0]}. "
                              "QAT needs a forward without data-dependent Python control flow; rewrite that "
                              "layer's forward or wrap the untraceable part with torch.fx.wrap") from err
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
BN_TENSORS = ("running_mean", "running_var", "weight", "bias")


def _batchnorm(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, dict] | None:
    """(module holding its tensors, {running_mean, running_var, weight, bias, eps}) for an inference 2-D BatchNorm.

    Either a BatchNorm2d leaf or, for subclasses that fx traces through (timm's BatchNormAct2d:
    BN, then its activation), the `F.batch_norm` call on the module's own tensors.
    """
    if node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d):
        bn = modules[node.target]
        if bn.running_mean is None:
            return None
        return node.target, {**{k: getattr(bn, k) for k in BN_TENSORS}, "eps": bn.eps}
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    args = {**dict(zip(BN_ARGS, node.args)), **node.kwargs}
    tensors = {k: args.get(k) for k in BN_TENSORS}
    if args.get("training") or any(not (t is None or isinstance(t, fx.Node) and t.op == "get_attr")
                                   for t in tensors.values()):
        return None
    owners = {t.target.rpartition(".")[0] for t in tensors.values() if t is not None}
    if tensors["running_mean"] is None or tensors["running_var"] is None or len(owners) != 1:
        return None
    owner = owners.pop()  # a plain container in the GraphModule: fx copies only the attributes the graph reads
    values = {k: None if t is None else getattr(modules[owner], t.target.rpartition(".")[2]) for k, t in tensors.items()}
    return owner, {**values, "eps": args.get("eps", 1e-5)}


METADATA = ("ndim", "shape", "dtype", "device")


def _value_users(node: fx.Node) -> list[fx.Node]:
    """The users of `node` that read its values, not only its shape (timm asserts `x.ndim == 4` before each BN)."""
    return [u for u in node.users if not (u.op == "call_function" and u.target is getattr and u.args[1] in METADATA
                                          or u.op == "call_method" and u.target in ("dim", "size"))]


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """A traced copy of `model` with every BatchNorm2d that directly follows a conv folded into it.

    A BN whose input is not a conv used only by it (pre-activation BN in WRN) is left as it is.
    BN subclasses that fx traces through (timm's BatchNormAct2d) fold the same way; their
    activation stays. Module names are kept, so parameter names (and pruning masks) still match.
    """
    was_training = model.training
    gm = trace(copy.deepcopy(model).eval())
    modules = dict(gm.named_modules())
    uses: dict[str, int] = {}  # calls of each module, reads of each BN tensor
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            key = node.target if node.op == "call_module" else node.target.rpartition(".")[0]
            uses[key] = uses.get(key, 0) + 1
    for node in list(gm.graph.nodes):
        found = _batchnorm(node, modules)
        if found is None:
            continue
        owner, bn = found
        conv_node = node.args[0]
        n_reads = 1 if node.op == "call_module" else sum(bn[k] is not None for k in BN_TENSORS)
        if not (isinstance(conv_node, fx.Node) and conv_node.op == "call_module"
                and isinstance(modules[conv_node.target], nn.Conv2d)
                and _value_users(conv_node) == [node] and uses[conv_node.target] == 1 and uses[owner] == n_reads):
            continue
        conv = modules[conv_node.target]
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn["running_mean"], bn["running_var"],
                                                      bn["eps"], bn["weight"], bn["bias"])
        node.replace_all_uses_with(conv_node)
        reads = [a for a in node.all_input_nodes if a.op == "get_attr"]
        gm.graph.erase_node(node)
        if node.op == "call_module":
            gm.delete_submodule(owner)
        for a in reads:  # F.batch_norm: the module stays (its activation is still called), its BN tensors go
            gm.graph.erase_node(a)
            delattr(modules[owner], a.target.rpartition(".")[2])
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

RELU_FUNCS = {F.relu, torch.relu, F.relu6}  # clip at 0 (and 6): ORT folds them into the QuantizeLinear after them
RELU_MODULES = (nn.ReLU, nn.ReLU6)
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
        if isinstance(m, RELU_MODULES):
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


def _feeds_layer_norm(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `node` is read by a LayerNorm / GroupNorm, directly or through grid-keeping ops (dropout)."""
    for user in node.users:
        if (user.op == "call_module" and isinstance(modules[user.target], (nn.LayerNorm, nn.GroupNorm))
                or user.op == "call_function" and user.target in (F.layer_norm, F.group_norm)):
            return True
        if _kind(user, modules) == "same_grid" and _feeds_layer_norm(user, modules):
            return True
    return False


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
    for node in list(gm.graph.nodes):  # zoo blocks are full of Identity placeholders; they would hide conv -> relu
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
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
    image = next(n for n in gm.graph.nodes if n.op == "placeholder")  # the rest are fixed extras (see `trace`)
    for node in list(gm.graph.nodes):
        kind = _kind(node, modules)
        if kind == "input" and node is image:
            _insert_quant(gm, node, node.name, cfg)
        elif kind == "compute" or kind == "add" and not _feeds_layer_norm(node, modules):
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

    def _weights(self, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) dequantized; `transposed`: the weight as [in, out], its channels on axis 1."""
        ops = torch.ops.quantized_decomposed
        q, axis = (self.weight_int8.t(), 1) if transposed else (self.weight_int8, 0)
        w = ops.dequantize_per_channel(q, self.weight_scale, self.weight_zero_point, axis, W_QMIN, W_QMAX, torch.int8)
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
        if x.dim() == 2:
            w, b = self._weights()
            return F.linear(x, w, b)  # Gemm with transB: ORT's QGemm
        # Tokens ([batch, seq, features], a ViT): x @ W^T as a MatMul fed straight by the DequantizeLinear of
        # the transposed INT8 weight (per column; the exporter folds the transpose into the initialiser),
        # the form ORT's QDQ MatMul fusion takes; a Transpose after the DequantizeLinear would hide it.
        w_t, b = self._weights(transposed=True)
        return torch.matmul(x, w_t) + b


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

    The batch dimension is symbolic, as for the FP32 export (`distillery.onnx_export.export_program`). The exporter's optimiser
    runs after translation: it folds the scale casts but leaves DequantizeLinear(INT8) alone,
    which the check below makes sure of.
    """
    deploy = to_deploy(qat_model)
    n_weights = sum(isinstance(m, _Int8Weights) for m in deploy.modules())
    with atomic_path(path) as tmp:
        program = export_program(deploy, (example_inputs,), opset, optimize=False)
        with quiet_export():
            program.optimize()
        program.save(str(tmp))
        pool_as_global_average(tmp)  # ORT then runs the pooling as one INT8 kernel, not DQ + FP32 ReduceMean + Q
        onnx.checker.check_model(str(tmp))
        if len(int8_initializers(tmp)) != n_weights:
            raise RuntimeError(f"{path}: {len(int8_initializers(tmp))} INT8 weight initialisers for {n_weights} "
                               "quantized layers; the exporter folded weights back to float")
        # rounding moves a few output steps; a broken graph far more
        err = check_batches(tmp, deploy, example_inputs, atol=1e-6, rtol=0.1)
        if err > 1:
            raise RuntimeError(f"{path}: ORT output differs from the deployed torch model by {err:.2f}x the "
                               "tolerance (10 % of the largest output)")
    return Path(path)


def int8_initializers(onnx_path: Path | str) -> list[str]:
    """Names of the INT8 weight initialisers (INT8 data dequantized by DequantizeLinear) in an ONNX file."""
    graph = onnx.load(str(onnx_path)).graph
    int8 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    return [n.input[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8]
