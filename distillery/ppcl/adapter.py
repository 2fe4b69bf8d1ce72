"""Where a transformer's block stack is and how to run it, so PPCL works on any block-stacked model.

A model is `head(blocks(embed(inputs)))`: `embed` turns the model inputs into one hidden state per
stream plus an optional conditioning vector, every block maps the streams to new streams, `head`
turns the final streams into the output. Hidden states are indexed h_0 .. h_L: h_i enters block i
(0-based) and h_{i+1} leaves it, so an interval (u, v) of blocks is the slice `blocks[u:v]`, mapping
h_u to h_v.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from distillery.models.mmdit import MMDiT, ResidualLinear
from distillery.models.vit import ViT

States = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Adapter:
    """How to run a model's blocks one by one. Functions are module-level so that an adapter pickles
    (callers can fan intervals out to worker processes)."""

    streams: tuple[str, ...]  # one name per hidden-state stream: ("img", "txt") or ("h",)
    embed: Callable[[nn.Module, tuple], tuple[States, torch.Tensor | None]]  # (model, inputs) -> (states, cond)
    head: Callable[[nn.Module, States, torch.Tensor | None], torch.Tensor]  # (model, states, cond) -> output
    uses_cond: bool = False  # blocks are called block(*states, cond) rather than block(*states)
    blocks_attr: str = "blocks"  # the nn.ModuleList of blocks
    mlp_attrs: tuple[str, ...] = ()  # per stream: the block attribute holding that stream's MLP
    spec_keys: tuple[str, ...] = ()  # per stream: the build_model spec key listing linearised MLPs
    output_stream: int = 0  # the stream whose h_L is "the final hidden output" (CKA compares it)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return getattr(model, self.blocks_attr)

    def call(self, block: nn.Module, states: States, cond: torch.Tensor | None) -> States:
        """Run one block with this model's calling convention; always returns a tuple of streams."""
        out = block(*states, cond) if self.uses_cond else block(*states)
        return out if isinstance(out, tuple) else (out,)

    def run(self, blocks: Sequence[nn.Module], states: States, cond: torch.Tensor | None) -> States:
        for block in blocks:
            states = self.call(block, states, cond)
        return states


class StreamwiseBlock(nn.Module):
    """A block made of one module per stream, applied stream by stream (the condition is ignored):
    how per-stream linear probes take a block's place."""

    def __init__(self, mods: Sequence[nn.Module], uses_cond: bool):
        super().__init__()
        self.mods = nn.ModuleList(mods)
        self.uses_cond = uses_cond

    def forward(self, *args):
        states = args[:-1] if self.uses_cond else args
        out = tuple(m(s) for m, s in zip(self.mods, states))
        return out if len(out) > 1 else out[0]


def _mmdit_embed(model, inputs):
    return model.embed(*inputs)


def _mmdit_head(model, states, cond):
    return model.head(states, cond)


def _vit_embed(model, inputs):
    return (model.embed(*inputs),), None


def _vit_head(model, states, cond):
    return model.head(states[0])


MMDIT = Adapter(streams=("img", "txt"), embed=_mmdit_embed, head=_mmdit_head, uses_cond=True,
                mlp_attrs=("mlp_img", "mlp_txt"), spec_keys=("linear_mlp_img", "linear_mlp_txt"))
VIT = Adapter(streams=("h",), embed=_vit_embed, head=_vit_head, mlp_attrs=("mlp",), spec_keys=("linear_mlp",))


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a model from the zoo."""
    for cls, adapter in ((MMDiT, MMDIT), (ViT, VIT)):
        if isinstance(model, cls):
            return adapter
    raise TypeError(f"no PPCL adapter for {type(model).__name__}; build an Adapter for it")


@dataclass
class Trace:
    """Every hidden state of a run: `hidden[i]` enters block i, `hidden[L]` leaves the last block."""

    hidden: list[States]
    cond: torch.Tensor | None
    output: torch.Tensor

    @property
    def n_blocks(self) -> int:
        return len(self.hidden) - 1

    def __len__(self) -> int:
        return len(self.output)


@torch.no_grad()
def trace(model: nn.Module, adapter: Adapter, inputs: tuple, batch_size: int = 512) -> Trace:
    """Run `model` on `inputs` (a tuple of tensors, batch first) in eval mode, keeping every h_i."""
    was_training = model.training
    model.eval()
    chunks = []
    for i in range(0, len(inputs[0]), batch_size):
        states, cond = adapter.embed(model, tuple(x[i:i + batch_size] for x in inputs))
        hidden = [states]
        for block in adapter.blocks(model):
            states = adapter.call(block, states, cond)
            hidden.append(states)
        chunks.append((hidden, cond, adapter.head(model, states, cond)))
    model.train(was_training)
    n_streams = len(chunks[0][0][0])
    hidden = [tuple(torch.cat([c[0][i][s] for c in chunks]) for s in range(n_streams))
              for i in range(len(chunks[0][0]))]
    cond = None if chunks[0][1] is None else torch.cat([c[1] for c in chunks])
    return Trace(hidden, cond, torch.cat([c[2] for c in chunks]))


def replace_blocks(model: nn.Module, adapter: Adapter, blocks: Sequence[nn.Module]) -> nn.Module:
    """A deep copy of `model` whose block stack is `blocks` (copied too)."""
    stack = adapter.blocks(model)
    setattr(model, adapter.blocks_attr, nn.ModuleList())  # keep the old stack out of the copy
    try:
        out = copy.deepcopy(model)
    finally:
        setattr(model, adapter.blocks_attr, stack)
    setattr(out, adapter.blocks_attr, nn.ModuleList(copy.deepcopy(list(blocks))))
    return out


def spec_of(model: nn.Module, adapter: Adapter, base_spec: dict) -> dict:
    """`base_spec` updated to the model's current depth and linearised MLPs: what `build_model`
    needs to rebuild a pruned model before `load_state_dict`."""
    spec = dict(base_spec)
    blocks = adapter.blocks(model)
    spec["depth"] = len(blocks)
    for attr, key in zip(adapter.mlp_attrs, adapter.spec_keys):
        spec[key] = [i for i, b in enumerate(blocks) if isinstance(getattr(b, attr, None), ResidualLinear)]
    return spec
