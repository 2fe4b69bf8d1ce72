"""Rectified flow (flow matching) for the MMDiT: the training objective and a fixed-step Euler sampler.

Convention, used everywhere in `distillery.ppcl`: t = 0 is data, t = 1 is noise,
`x_t = (1 - t) x0 + t * noise`, and the model predicts the velocity `dx_t/dt = noise - x0`.
Sampling integrates from t = 1 down to t = 0: `x <- x + (t_next - t) * v`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from distillery.ppcl.text import MAX_LEN, TEMPLATES, caption, tokenize

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FlowConfig:
    steps: int = 1500  # ~0.2 s per step for the default MMDiT on one idle core (10 GFLOP per step)
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    ema_decay: float = 0.998  # the returned weights are the EMA; 0 disables it
    caption_dropout: float = 0.1  # share of empty captions, what classifier-free guidance needs
    t_sampling: Literal["uniform", "logit_normal"] = "logit_normal"  # SD3's choice: more steps at mid t
    seed: int = 0
    log_every: int = 50


@dataclass
class FlowHistory:
    steps: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x_t, velocity target)` for data `x0`, `noise` and times `t` of shape (n,)."""
    tt = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tt) * x0 + tt * noise, noise - x0


def sample_t(n: int, how: str, gen: torch.Generator) -> torch.Tensor:
    if how == "uniform":
        return torch.rand(n, generator=gen)
    return torch.sigmoid(torch.randn(n, generator=gen))


def all_caption_tokens(max_len: int = MAX_LEN) -> torch.Tensor:
    """Token ids of every (digit, template) caption: (10, n_templates, max_len)."""
    ids = [tokenize([caption(d, k) for k in range(len(TEMPLATES))], max_len) for d in range(10)]
    return torch.as_tensor(np.stack(ids))


def random_tokens(labels: torch.Tensor, gen: torch.Generator, dropout: float = 0.0,
                  max_len: int = MAX_LEN) -> torch.Tensor:
    """A caption per label with a random template; a `dropout` share of them emptied (all pad)."""
    table = all_caption_tokens(max_len)
    k = torch.randint(0, table.shape[1], (len(labels),), generator=gen)
    tokens = table[labels, k]
    if dropout > 0:
        tokens = tokens * (torch.rand(len(labels), generator=gen) >= dropout).long()[:, None]
    return tokens


def noisy_inputs(x0: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, n: int, seed: int,
                 t_sampling: str = "uniform", caption_dropout: float = 0.0) -> tuple[torch.Tensor, ...]:
    """`n` model inputs `(x_t, t, tokens)` drawn from the data: what probes and students calibrate on."""
    gen = torch.Generator().manual_seed(seed)
    x0, y = torch.as_tensor(x0, dtype=torch.float32), torch.as_tensor(y)
    idx = torch.randint(0, len(x0), (n,), generator=gen)
    t = sample_t(n, t_sampling, gen)
    x_t, _ = interpolate(x0[idx], torch.randn(x0[idx].shape, generator=gen), t)
    return x_t, t, random_tokens(y[idx], gen, caption_dropout)


def train_flow_matching(model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
                        cfg: FlowConfig, desc: str = "flow matching") -> FlowHistory:
    """Train `model(x_t, t, tokens)` in place on images `x` (n, c, h, w, scaled to [-1, 1]) and labels `y`."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps,
                                                pct_start=cfg.warmup_ratio, anneal_strategy="cos")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay)) if cfg.ema_decay > 0 else None
    hist, t0, running = FlowHistory(), time.perf_counter(), []
    model.train()
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", leave=True)
    for step in bar:
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
        x0 = x[idx]
        t = sample_t(len(idx), cfg.t_sampling, gen)
        x_t, target = interpolate(x0, torch.randn(x0.shape, generator=gen), t)
        tokens = random_tokens(y[idx], gen, cfg.caption_dropout)
        # batches are drawn on the CPU (same numbers on any device), then moved to the model's device
        x_t, t, tokens, target = (v.to(device) for v in (x_t, t, tokens, target))
        loss = F.mse_loss(model(x_t, t, tokens), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(model)
        running.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            hist.steps.append({"step": step + 1, "loss": float(np.mean(running)), "lr": sched.get_last_lr()[0]})
            bar.set_postfix(loss=f"{hist.steps[-1]['loss']:.4f}")
            running = []
    bar.close()
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())
    model.eval()
    hist.seconds = time.perf_counter() - t0
    return hist


@torch.no_grad()
def sample(model: Denoiser, tokens: torch.Tensor, noise: torch.Tensor, steps: int = 20,
           guidance: float = 1.0) -> torch.Tensor:
    """Euler integration from `noise` (t = 1) to an image (t = 0); `guidance` > 1 is classifier-free
    guidance against the empty caption, both branches in one batch."""
    x = noise.clone()
    tokens = torch.as_tensor(tokens)
    if guidance != 1.0:
        tokens = torch.cat([tokens, torch.zeros_like(tokens)])
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        t = ts[i].expand(len(tokens))
        if guidance != 1.0:
            v_cond, v_uncond = model(torch.cat([x, x]), t, tokens).chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
        else:
            v = model(x, t, tokens)
        x = x + (ts[i + 1] - ts[i]) * v
    return x
