"""Depth pruning: one student block per interval, distilled from the teacher's own activations.

Non-sequential ("pluggable") distillation: the student of (u, v) maps the TEACHER's h_u to the
teacher's h_v, so intervals train independently (call `distill_interval` once per interval, in any
order or in parallel) and any subset of students plugs into the teacher without further training
(`assemble`). `distill_sequential` is the ablation where each student is fed by the model with the
earlier students already in place.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from distillery.ppcl.adapter import Adapter, States, Trace, replace_blocks
from distillery.ppcl.intervals import Interval


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 300  # ~10 s per interval for the default MMDiT on an idle core (28 s on a loaded one)
    lr: float = 3e-4
    batch_size: int = 128  # samples (all their tokens) per step
    weight_decay: float = 0.0
    loss: Literal["normalized_mse", "normalized_l1", "mse"] = "normalized_mse"  # the paper's: MSE of L2-normalised tokens
    seed: int = 0


@dataclass
class DistillHistory:
    losses: list[float] = field(default_factory=list)  # per step
    initial: float = float("nan")  # loss on all the calibration data before / after training
    final: float = float("nan")


def block_loss(out: States, target: States, kind: str) -> torch.Tensor:
    """Summed over streams; the normalised losses compare per-token directions (L2 over features)."""
    total = 0.0
    for o, t in zip(out, target):
        if kind == "mse":
            total = total + F.mse_loss(o, t)
        else:
            diff = F.normalize(o, dim=-1) - F.normalize(t, dim=-1)
            total = total + (diff.pow(2).mean() if kind == "normalized_mse" else diff.abs().mean())
    return total


@torch.no_grad()
def evaluate(block: nn.Module, adapter: Adapter, inputs: States, cond: torch.Tensor | None, targets: States,
             kind: str, batch_size: int = 512) -> float:
    was_training = block.training
    block.eval()
    total, n = 0.0, len(inputs[0])
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        out = adapter.call(block, tuple(x[sl] for x in inputs), None if cond is None else cond[sl])
        total += block_loss(out, tuple(t[sl] for t in targets), kind).item() * len(out[0])
    block.train(was_training)
    return total / n


def train_block(block: nn.Module, adapter: Adapter, inputs: States, cond: torch.Tensor | None, targets: States,
                cfg: DistillConfig, params: Sequence[nn.Parameter] | None = None, desc: str = "distill") -> DistillHistory:
    """Train `block` (or only `params` of it) in place so that block(inputs, cond) matches `targets`."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = list(block.parameters()) if params is None else list(params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.steps))
    hist = DistillHistory(initial=evaluate(block, adapter, inputs, cond, targets, cfg.loss))
    n = len(inputs[0])
    block.train()
    for _ in tqdm(range(cfg.steps), desc=desc, unit="step", leave=False):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
        out = adapter.call(block, tuple(x[idx] for x in inputs), None if cond is None else cond[idx])
        loss = block_loss(out, tuple(t[idx] for t in targets), cfg.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        hist.losses.append(loss.item())
    block.eval()
    hist.final = evaluate(block, adapter, inputs, cond, targets, cfg.loss)
    return hist


def middle_block(teacher: nn.Module, adapter: Adapter, interval: Interval) -> nn.Module:
    """A copy of the interval's middle block (the lower middle for an even count): the student's init."""
    u, v = interval
    if not 0 <= u < v <= len(adapter.blocks(teacher)):
        raise ValueError(f"interval {interval} is outside the {len(adapter.blocks(teacher))} blocks")
    return copy.deepcopy(adapter.blocks(teacher)[(u + v - 1) // 2])


def distill_interval(teacher: nn.Module, adapter: Adapter, trace: Trace, interval: Interval,
                     cfg: DistillConfig = DistillConfig()) -> tuple[nn.Module, DistillHistory]:
    """The student of one interval (u, v): teacher h_u -> teacher h_v, from the teacher's `trace`."""
    u, v = interval
    student = middle_block(teacher, adapter, interval)
    hist = train_block(student, adapter, trace.hidden[u], trace.cond, trace.hidden[v], cfg, desc=f"student {u}:{v}")
    return student, hist


def distill_sequential(teacher: nn.Module, adapter: Adapter, trace: Trace, intervals: Sequence[Interval],
                       cfg: DistillConfig = DistillConfig()) -> dict[Interval, tuple[nn.Module, DistillHistory]]:
    """Ablation: students trained in order of start, each on the hidden state produced by the teacher
    with the earlier students already in place (errors pile up), target still the teacher's h_v."""
    check_disjoint(intervals, len(adapter.blocks(teacher)))
    blocks = list(adapter.blocks(teacher))
    out, states, pos = {}, trace.hidden[0], 0
    for u, v in sorted(intervals):
        with torch.no_grad():
            states = adapter.run(blocks[pos:u], states, trace.cond)
        student = middle_block(teacher, adapter, (u, v))
        out[(u, v)] = (student, train_block(student, adapter, states, trace.cond, trace.hidden[v], cfg,
                                            desc=f"sequential {u}:{v}"))
        with torch.no_grad():
            states = adapter.call(student, states, trace.cond)
        pos = v
    return out


def check_disjoint(intervals: Sequence[Interval], n_blocks: int) -> None:
    prev_end = 0
    for u, v in sorted(intervals):
        if not 0 <= u < v <= n_blocks:
            raise ValueError(f"interval ({u}, {v}) is outside blocks 0..{n_blocks}")
        if u < prev_end:
            raise ValueError(f"intervals overlap at block {u}: {sorted(intervals)}")
        prev_end = v


def assemble(teacher: nn.Module, adapter: Adapter, students: Mapping[Interval, nn.Module | None]) -> nn.Module:
    """A copy of `teacher` with blocks[u:v] replaced by `students[(u, v)]` (None drops them), no training.
    The teacher is left unchanged."""
    blocks = list(adapter.blocks(teacher))
    check_disjoint(list(students), len(blocks))
    starts = dict(students)
    new, i = [], 0
    while i < len(blocks):
        key = next((k for k in starts if k[0] == i), None)
        if key is None:
            new.append(blocks[i])
            i += 1
        else:
            if starts[key] is not None:
                new.append(starts[key])
            i = key[1]
    return replace_blocks(teacher, adapter, new)


def load_student(teacher: nn.Module, adapter: Adapter, interval: Interval, state_dict: dict) -> nn.Module:
    """Rebuild a saved student (a `state_dict` of a block) for `assemble`."""
    student = middle_block(teacher, adapter, interval)
    student.load_state_dict(state_dict)
    return student.eval()
