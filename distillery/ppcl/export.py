"""One denoising step of a (pruned) MMDiT as ONNX: inputs x_t, t, tokens; output the velocity.

`export_step` returns the ModelProto (the stage saves it). `time_models` in `distillery.latency` feeds
a single input, so `PackedStep` offers the same step behind one float input
[x_t flattened, t, tokens as floats], unpacked inside the graph with the same compute.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn

STEP_INPUTS = ("x", "t", "tokens")


class PackedStep(nn.Module):
    """`model(x, t, tokens)` behind one float input of shape (batch, c*h*w + 1 + text_len)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.shape = (model.in_channels, model.image_size, model.image_size)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        n = self.shape[0] * self.shape[1] * self.shape[2]
        x = packed[:, :n].reshape(-1, *self.shape)
        return self.model(x, packed[:, n], packed[:, n + 1:].round().long())


def pack_inputs(x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.flatten(1), t[:, None].float(), tokens.float()], dim=1)


def export_step(model: nn.Module, example: tuple[torch.Tensor, ...], opset: int = 18,
                dynamic_batch: bool = True) -> onnx.ModelProto:
    """ONNX of `model(*example)` via the dynamo exporter; input names are x, t, tokens
    (or `packed` for a PackedStep), output `velocity`; the batch size is left free unless
    `dynamic_batch` is False."""
    model = model.eval()
    if dynamic_batch and len(example[0]) == 1:  # torch.export fixes a size-1 dimension to 1
        example = tuple(torch.cat([e, e]) for e in example)
    names = ["packed"] if isinstance(model, PackedStep) else list(STEP_INPUTS[:len(example)])
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic = {name: {0: batch} for name in names}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*The axis name")  # one Dim shared by the inputs, on purpose
        program = torch.onnx.export(model, example, input_names=names, output_names=["velocity"],
                                    opset_version=opset, dynamo=True, dynamic_shapes=dynamic, verbose=False)
    program.optimize()
    return program.model_proto


def feeds(x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """The ONNX Runtime inputs of one step."""
    return {"x": x.numpy().astype(np.float32), "t": t.numpy().astype(np.float32), "tokens": tokens.numpy().astype(np.int64)}


class KwargsForward(nn.Module):
    """A library model's forward behind positional tensor inputs (`names`), its other keyword
    arguments (`static`: image shapes, position ids) fixed: what the ONNX exporter and the timers call."""

    def __init__(self, model: nn.Module, names: list[str], static: dict):
        super().__init__()
        self.model, self.names, self.static = model, list(names), dict(static)

    def forward(self, *tensors):
        from distillery.ppcl.hf import forward_output
        return forward_output(self.model, {**self.static, **dict(zip(self.names, tensors))})


def split_example(kwargs: dict) -> tuple[list[str], tuple[torch.Tensor, ...], dict]:
    """(tensor names, tensors, the rest) of one call's keyword arguments."""
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return names, tuple(kwargs[k] for k in names), {k: v for k, v in kwargs.items() if k not in names}


def export_forward(model: nn.Module, kwargs: dict, opset: int = 18) -> onnx.ModelProto:
    """ONNX of one forward of a library model on `kwargs` (batch size fixed to theirs), dynamo exporter;
    inputs named as the keyword arguments, output `output`."""
    names, tensors, static = split_example(kwargs)
    wrapped = KwargsForward(model.eval(), names, static)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapped, tensors, input_names=names, output_names=["output"],
                                    opset_version=opset, dynamo=True, verbose=False)
    program.optimize()
    return program.model_proto
