"""Where a transformer's block stack is and how to run it, so PPCL works on any block-stacked model.

A model is `head(blocks(embed(inputs)))`: `embed` turns the model inputs into one hidden state per
stream plus an optional conditioning vector, every block maps the streams to new streams, `head`
turns the final streams into the output. Hidden states are indexed h_0 .. h_L: h_i enters block i
(0-based) and h_{i+1} leaves it, so an interval (u, v) of blocks is the slice `blocks[u:v]`, mapping
h_u to h_v.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from distillery.models.mmdit import MMDiT, ResidualLinear
from distillery.models.vit import ViT

States = tuple[torch.Tensor, ...]


@dataclass
class Cond:
    """What every block needs besides the streams, computed once per batch by `Adapter.embed`:
    `batched` tensors have one row per sample (timestep embedding, padding masks) and are indexed with
    the streams; `shared` values are the same for every sample (rotary tables, image shapes)."""

    batched: dict[str, torch.Tensor] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, idx) -> "Cond":
        return Cond({k: v[idx] for k, v in self.batched.items()}, self.shared)

    def get(self, key: str, default=None):
        return self.batched.get(key, self.shared.get(key, default))

    def to(self, device) -> "Cond":
        return Cond({k: v.to(device) for k, v in self.batched.items()},
                    {k: _to(v, device) for k, v in self.shared.items()})

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        keys = set(conds[0].batched)
        if any(set(c.batched) != keys or set(c.shared) != set(conds[0].shared) for c in conds):
            raise ValueError("the blocks' condition differs in kind between batches of one set of inputs "
                             f"({sorted(keys)} vs {[sorted(c.batched) for c in conds if set(c.batched) != keys][:1]})")
        return Cond({k: torch.cat([c.batched[k] for c in conds]) for k in conds[0].batched}, conds[0].shared)


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


def cat_cond(conds: Sequence) -> Any:
    """Concatenate per-chunk conditions (None, a tensor or a `Cond`) along the batch."""
    if conds[0] is None:
        return None
    return Cond.cat(conds) if isinstance(conds[0], Cond) else torch.cat(list(conds))


def n_samples(inputs) -> int:
    """Batch size of model inputs: a tuple of batch-first tensors or a `ModelInputs`-like object."""
    return len(inputs) if hasattr(inputs, "take") else len(inputs[0])


def take(inputs, idx):
    """Rows `idx` (a slice or index tensor) of model inputs."""
    return inputs.take(idx) if hasattr(inputs, "take") else tuple(x[idx] for x in inputs)


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
    # models whose stack is not one plain attribute (two stacks, a fixed last block) or whose blocks take
    # keyword arguments: (model) -> blocks, (model, blocks) -> None, (block, states, cond) -> states
    get_blocks: Callable[[nn.Module], Sequence[nn.Module]] | None = None
    set_blocks: Callable[[nn.Module, Sequence[nn.Module]], None] | None = None
    call_block: Callable[[nn.Module, States, Any], States] | None = None
    name: str = ""

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        if self.get_blocks is not None:
            return nn.ModuleList(self.get_blocks(model))
        return getattr(model, self.blocks_attr)

    def put_blocks(self, model: nn.Module, blocks: Sequence[nn.Module]) -> None:
        """Make `blocks` the model's block stack (in place)."""
        if self.set_blocks is not None:
            self.set_blocks(model, list(blocks))
        else:
            setattr(model, self.blocks_attr, nn.ModuleList(blocks))

    def call(self, block: nn.Module, states: States, cond) -> States:
        """Run one block with this model's calling convention; always returns a tuple of streams."""
        if isinstance(block, StreamwiseBlock):
            return block.apply(states)
        if self.call_block is not None:
            return self.call_block(block, states, cond)
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
        out = self.apply(states)
        return out if len(out) > 1 else out[0]

    def apply(self, states: States) -> States:
        return tuple(m(s) for m, s in zip(self.mods, states))


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
    """The adapter of a model from the zoo (`distillery.ppcl.hf.adapter_for` also knows the diffusers and
    transformers classes)."""
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
def trace(model: nn.Module, adapter: Adapter, inputs, batch_size: int = 512) -> Trace:
    """Run `model` on `inputs` (a tuple of batch-first tensors, or `ModelInputs` of a library model) in
    eval mode, keeping every h_i."""
    was_training = model.training
    model.eval()
    chunks = []
    for i in range(0, n_samples(inputs), batch_size):
        states, cond = adapter.embed(model, take(inputs, slice(i, i + batch_size)))
        hidden = [states]
        for block in adapter.blocks(model):
            states = adapter.call(block, states, cond)
            hidden.append(states)
        chunks.append((hidden, cond, adapter.head(model, states, cond)))
    model.train(was_training)
    n_streams = len(chunks[0][0][0])
    hidden = [tuple(torch.cat([c[0][i][s] for c in chunks]) for s in range(n_streams))
              for i in range(len(chunks[0][0]))]
    return Trace(hidden, cat_cond([c[1] for c in chunks]), torch.cat([c[2] for c in chunks]))


def replace_blocks(model: nn.Module, adapter: Adapter, blocks: Sequence[nn.Module]) -> nn.Module:
    """A deep copy of `model` whose block stack is `blocks` (copied too)."""
    stack = list(adapter.blocks(model))
    adapter.put_blocks(model, [])  # keep the old stack out of the copy
    try:
        out = copy.deepcopy(model)
    finally:
        adapter.put_blocks(model, stack)
    adapter.put_blocks(out, copy.deepcopy(list(blocks)))
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
