"""Files of PPCL's trained parts (one student block per interval, the probes), and the worker that
distils one interval in its own process (a regular module, so that spawned workers can import it)."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn as nn

from distillery.core.artifacts import atomic_path, load_artifact
from distillery.ppcl.adapter import Trace
from distillery.ppcl.depth import distill_interval, distill_sequential, load_student

Interval = tuple[int, int]


def interval_name(iv: Interval) -> str:
    return f"{iv[0]}_{iv[1]}"


def save_student(path: Path, state: dict, interval: Interval, initial: float, final: float, kind: str) -> None:
    """One student's weights and its loss before and after training, written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"interval": list(interval), "state_dict": state, "loss_initial": initial, "loss_final": final,
                    "kind": kind}, f)


def load_students(folder: Path, teacher: nn.Module, adapter, intervals) -> dict[Interval, nn.Module]:
    """The students of `intervals`, each from its own file, rebuilt on the teacher's middle block."""
    out = {}
    for iv in intervals:
        iv = tuple(iv)
        ckpt = load_student_file(folder / f"{interval_name(iv)}.pt")
        out[iv] = load_student(teacher, adapter, iv, ckpt["state_dict"])
    return out


def load_student_file(path: Path) -> dict:
    return load_artifact(path, "student", "depth_distill")


def load_probe_file(path: Path) -> dict:
    return load_artifact(path, "probe", "probe")


def distill_worker(job: dict) -> dict:
    """Train one interval's student (or the sequential chain) in this process; returns state dicts.

    `job`: {"kind": "interval" | "sequential", "teacher": folder with source.json, "intervals": [...],
    "states": {index: states}, "cond": the blocks' condition, "cfg": DistillConfig, "threads": n}. Only the
    hidden states the job needs travel to the worker.
    """
    from distillery.ppcl.hf import adapter_for
    from distillery.ppcl.source import load_teacher
    torch.set_num_threads(job.get("threads", 1))
    teacher, _ = load_teacher(Path(job["teacher"]))
    adapter = adapter_for(teacher)
    device = next(iter(job["states"].values()))[0].device
    teacher.to(device)
    n = len(adapter.blocks(teacher))
    hidden = [job["states"].get(i, ()) for i in range(n + 1)]
    tr = Trace(hidden, job["cond"], torch.empty(0))
    if job["kind"] == "interval":
        iv = tuple(job["intervals"][0])
        student, hist = distill_interval(teacher, adapter, tr, iv, job["cfg"])
        return {"kind": "interval", "results": {iv: (_cpu(student.state_dict()), hist.initial, hist.final)}}
    # the sequential chain needs every state; the caller sends them all
    seq = distill_sequential(teacher, adapter, tr, [tuple(i) for i in job["intervals"]], job["cfg"])
    return {"kind": "sequential",
            "results": {iv: (_cpu(s.state_dict()), h.initial, h.final) for iv, (s, h) in seq.items()}}


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() for k, v in state.items()}


def jobs(teacher: Path | str, tr: Trace, students, sequential, cfg) -> list[dict]:
    """One job per independent interval, plus one for the sequential chain; each carries only its states.

    `teacher` is the checkpoint each worker loads the teacher from.
    """
    out = [{"kind": "interval", "teacher": str(teacher), "intervals": [list(iv)], "cond": tr.cond, "cfg": cfg,
            "states": {iv[0]: tr.hidden[iv[0]], iv[1]: tr.hidden[iv[1]]}} for iv in students]
    if sequential:
        need = {0} | {v for _, v in sequential}
        out.append({"kind": "sequential", "teacher": str(teacher), "intervals": [list(iv) for iv in sequential],
                    "cond": tr.cond, "cfg": cfg, "states": {i: tr.hidden[i] for i in need}})
    return out


def run_jobs(all_jobs: list[dict], workers: int) -> list[dict]:
    """Jobs in `workers` processes at once (spawned: no OpenMP state forked), or in this one for 1
    (with every core, and always on a GPU)."""
    if workers <= 1 or len(all_jobs) <= 1:
        import os
        return [distill_worker(j | {"threads": os.cpu_count() or 1}) for j in all_jobs]
    # longest first: the sequential chain holds several intervals
    order = sorted(range(len(all_jobs)), key=lambda i: -len(all_jobs[i]["intervals"]))
    with ProcessPoolExecutor(max_workers=min(workers, len(all_jobs)), mp_context=get_context("spawn")) as pool:
        futures = {i: pool.submit(distill_worker, all_jobs[i]) for i in order}
        return [futures[i].result() for i in range(len(all_jobs))]
