"""Files and helpers shared by the PPCL stages (ppcl_teacher, probe, intervals, depth_distill, width_prune, menu).

Paths of every PPCL artifact, the digits as the MMDiT sees them (8x8 in [-1, 1]), the foundation
classifier that scores prompt adherence, sample grids, and the worker that distills one interval in
its own process (a regular module, so that spawned workers can import it).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tasks.artifacts import atomic_path, load_checkpoint, load_model
from tasks.errors import ArtifactError

PREPARED = Path("data/prepared")
CLASSIFIER = Path("models/teacher.pt")  # the foundation digits classifier (stage `train`)
PPCL = Path("models/ppcl")
TEACHER = PPCL / "teacher.pt"
PROBES = PPCL / "probes.pt"
STUDENTS = PPCL / "students"
SEQUENTIAL = PPCL / "sequential"
WIDTH = PPCL / "width.pt"
INTERVALS = Path("reports/ppcl_intervals.json")
REPORTS = Path("reports/ppcl")

Interval = tuple[int, int]


def meta() -> dict:
    path = PREPARED / "meta.json"
    if not path.exists():
        raise ArtifactError(f"{path}: missing; run the prepare stage first (dvc repro prepare)")
    return json.loads(path.read_text())


def to_unit(x: np.ndarray, m: dict) -> torch.Tensor:
    """Prepared (standardised) images back to [0, 1]."""
    mean = torch.tensor(m["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(m["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (torch.as_tensor(x, dtype=torch.float32) * std + mean).clamp(0, 1)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)


def diffusion_data(image_size: int = 8, splits: tuple[str, ...] = ("train", "val")) -> tuple[torch.Tensor, torch.Tensor]:
    """The prepared splits as the MMDiT trains on them: de-standardised, resized to `image_size`, in [-1, 1]."""
    from tasks.data import load_split
    m = meta()
    xs, ys = zip(*(load_split(PREPARED, s) for s in splits))
    x = resize(to_unit(np.concatenate(xs), m), image_size)
    return x.clamp(0, 1) * 2 - 1, torch.as_tensor(np.concatenate(ys))


class Classifier(nn.Module):
    """The foundation classifier behind the preprocessing it was trained with: [-1, 1] -> [0, 1] ->
    prepare.image_size -> standardised with the train split's mean / std."""

    def __init__(self, model: nn.Module, m: dict):
        super().__init__()
        self.model = model.eval()
        self.size = int(m["image_size"])
        self.register_buffer("mean", torch.tensor(m["mean"], dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(m["std"], dtype=torch.float32).view(1, -1, 1, 1))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        x = resize((x.float().clamp(-1, 1) + 1) / 2, self.size)
        if x.shape[1] != self.mean.shape[1]:
            x = x.expand(-1, self.mean.shape[1], -1, -1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(x))


def load_classifier(path: Path = CLASSIFIER) -> Classifier:
    model, _ = load_model(path)
    return Classifier(model, meta())


def load_mmdit(path: Path = TEACHER) -> tuple[nn.Module, dict]:
    """The PPCL teacher (or any saved MMDiT variant) and its checkpoint."""
    return load_model(path)


def prompts(per_digit: int, seed: int, image_size: int = 8, channels: int = 1):
    """The fixed, seeded prompt set and its starting noise: (labels, tokens, noise)."""
    from tasks.ppcl.quality import prompt_noise, prompt_set
    labels, tokens = prompt_set(per_digit, seed=seed)
    return labels, torch.as_tensor(tokens), prompt_noise(len(labels), (channels, image_size, image_size), seed=seed)


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10) -> None:
    """A sample grid (one column per digit when the prompts are grouped by digit) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tasks.ppcl.quality import sample_grid
    grid = sample_grid(images, nrow=nrow)
    with atomic_path(path) as tmp:
        plt.imsave(tmp, grid, cmap="gray", vmin=0, vmax=1, format="png")


def grouped_by_digit(images: torch.Tensor, labels: np.ndarray, per_row: int = 10, rows: int = 10) -> torch.Tensor:
    """Up to `rows` samples of each digit laid out so that each grid row is one digit... transposed:
    row r holds the r-th sample of digits 0..9 (so each column is one prompt digit)."""
    out = []
    for r in range(rows):
        for d in range(per_row):
            idx = np.flatnonzero(labels == d)
            if r < len(idx):
                out.append(images[idx[r]])
    return torch.stack(out)


def interval_name(iv: Interval) -> str:
    return f"{iv[0]}_{iv[1]}"


def save_student(path: Path, block: nn.Module, interval: Interval, **extra) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"interval": list(interval), "state_dict": block.state_dict(), **extra}, f)


def load_students(folder: Path, teacher: nn.Module, adapter, intervals) -> dict[Interval, nn.Module]:
    """The students of `intervals`, each from its own file, rebuilt on the teacher's middle block."""
    from tasks.ppcl.depth import load_student
    out = {}
    for iv in intervals:
        iv = tuple(iv)
        ckpt = load_student_file(folder / f"{interval_name(iv)}.pt")
        out[iv] = load_student(teacher, adapter, iv, ckpt["state_dict"])
    return out


def load_student_file(path: Path) -> dict:
    if not path.exists():
        raise ArtifactError(f"{path}: student missing; run the depth_distill stage (dvc repro depth_distill)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ArtifactError(f"{path}: not a readable student file ({type(err).__name__}); re-run depth_distill") from None


def load_probe_file(path: Path = PROBES) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; run the probe stage (dvc repro probe)") from None
    except Exception as err:
        raise ArtifactError(f"{path}: not a readable probe file ({type(err).__name__}); re-run probe") from None
    return ckpt


def distill_worker(job: dict) -> dict:
    """Train one interval's student (or the sequential chain) in this process; returns state dicts.

    `job`: {"kind": "interval" | "sequential", "teacher": path, "intervals": [...], "states": {index: states},
    "cond": tensor, "cfg": DistillConfig}. Only the hidden states the job needs travel to the worker.
    """
    torch.set_num_threads(1)
    from tasks.ppcl.adapter import MMDIT, Trace
    from tasks.ppcl.depth import distill_interval, distill_sequential
    teacher, _ = load_model(job["teacher"])
    n = len(teacher.blocks)
    hidden = [job["states"].get(i, ()) for i in range(n + 1)]
    tr = Trace(hidden, job["cond"], torch.empty(0))
    if job["kind"] == "interval":
        iv = tuple(job["intervals"][0])
        student, hist = distill_interval(teacher, MMDIT, tr, iv, job["cfg"])
        return {"kind": "interval", "results": {iv: (student.state_dict(), hist.initial, hist.final)}}
    # the sequential chain needs every state; the caller sends them all
    seq = distill_sequential(teacher, MMDIT, tr, [tuple(i) for i in job["intervals"]], job["cfg"])
    return {"kind": "sequential",
            "results": {iv: (s.state_dict(), h.initial, h.final) for iv, (s, h) in seq.items()}}


def checkpoint_spec(path: Path) -> dict:
    return load_checkpoint(path)["spec"]
