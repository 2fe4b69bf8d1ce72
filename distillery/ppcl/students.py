"""Files of PPCL's trained parts (one student block per interval, the probes), and the worker that
distils one interval in its own process (a regular module, so that spawned workers can import it)."""
from __future__ import annotations

import os
from concurrent.futures import CancelledError, Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn as nn

from distillery.core.artifacts import atomic_path, load_artifact
from distillery.core.errors import DistilleryError
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

    `job`: {"kind": "interval" | "sequential", "teacher": folder with source.json, "root": the project root its
    relative paths are in, "intervals": [...], "states": {index: states}, "cond": the blocks' condition,
    "cfg": DistillConfig, "threads": n}. Only the hidden states the job needs travel to the worker. The result
    also names the process that computed it (`pid`).
    """
    from distillery.ppcl.hf import adapter_for
    from distillery.ppcl.source import load_teacher
    torch.set_num_threads(job.get("threads", 1))
    teacher, _ = load_teacher(Path(job["teacher"]), job.get("root"))
    adapter = adapter_for(teacher)
    device = next(iter(job["states"].values()))[0].device
    teacher.to(device)
    n = len(adapter.blocks(teacher))
    hidden = [job["states"].get(i, ()) for i in range(n + 1)]
    tr = Trace(hidden, job["cond"], torch.empty(0))
    if job["kind"] == "interval":
        iv = tuple(job["intervals"][0])
        student, hist = distill_interval(teacher, adapter, tr, iv, job["cfg"])
        return {"kind": "interval", "pid": os.getpid(),
                "results": {iv: (_cpu(student.state_dict()), hist.initial, hist.final)}}
    # the sequential chain needs every state; the caller sends them all
    seq = distill_sequential(teacher, adapter, tr, [tuple(i) for i in job["intervals"]], job["cfg"])
    return {"kind": "sequential", "pid": os.getpid(),
            "results": {iv: (_cpu(s.state_dict()), h.initial, h.final) for iv, (s, h) in seq.items()}}


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() for k, v in state.items()}


def jobs(teacher: Path | str, tr: Trace, students, sequential, cfg, root: Path | str | None = None) -> list[dict]:
    """One job per independent interval, plus one for the sequential chain; each carries only its states.

    `teacher` is the checkpoint each worker loads the teacher from; it and the relative paths in its
    `source.json` are resolved against `root` (default: this process's working directory), so that a worker
    running elsewhere (a Dask worker, sharing the filesystem) finds them.
    """
    root = Path(root if root is not None else Path.cwd()).resolve()
    teacher = str(root / teacher)  # an absolute `teacher` stays as it is
    out = [{"kind": "interval", "teacher": teacher, "root": str(root), "intervals": [list(iv)], "cond": tr.cond,
            "cfg": cfg, "states": {iv[0]: tr.hidden[iv[0]], iv[1]: tr.hidden[iv[1]]}} for iv in students]
    if sequential:
        need = {0} | {v for _, v in sequential}
        out.append({"kind": "sequential", "teacher": teacher, "root": str(root),
                    "intervals": [list(iv) for iv in sequential], "cond": tr.cond, "cfg": cfg,
                    "states": {i: tr.hidden[i] for i in need}})
    return out


def payload_bytes(job: dict) -> int:
    """The bytes of the tensors a job carries (its hidden states and the condition)."""
    def size(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.element_size() * x.nelement()
        if isinstance(x, dict):
            return sum(size(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(size(v) for v in x)
        return 0
    return size(job["states"]) + size(job["cond"])


# How a lost worker shows in its job's future: a local pool's dead process, or Dask's (KilledWorker once the
# scheduler gives up on the task, CancelledError when the client loses the scheduler, CommClosedError).
LOST = ("KilledWorker", "CommClosedError", "FutureCancelledError")


class WorkerLostError(DistilleryError):
    """A worker process died (or its cluster went away) while running a job; running again is the fix."""


def _lost(err: BaseException) -> bool:
    return isinstance(err, (BrokenProcessPool, CancelledError)) or type(err).__name__ in LOST


def run_jobs(all_jobs: list[dict], workers: int, executor: Executor | None = None) -> list[dict]:
    """Jobs in `workers` processes at once (spawned: no OpenMP state forked), or in this one for 1
    (with every core, and always on a GPU); or on `executor` (e.g. a Dask cluster's,
    `distributed.Client(address).get_executor()`), which the caller owns and closes. Results in the
    order of `all_jobs`, whichever ran them.

    A worker lost while running a job (its process killed) is a `DistilleryError` naming the job's intervals:
    nothing is written here, so running again starts clean. Any other error of a job is raised as it is.
    """
    if executor is None and (workers <= 1 or len(all_jobs) <= 1):
        return [distill_worker(j | {"threads": os.cpu_count() or 1}) for j in all_jobs]
    # longest first: the sequential chain holds several intervals
    order = sorted(range(len(all_jobs)), key=lambda i: -len(all_jobs[i]["intervals"]))
    if executor is not None:
        return _collect(all_jobs, {i: executor.submit(distill_worker, all_jobs[i]) for i in order})
    with ProcessPoolExecutor(max_workers=min(workers, len(all_jobs)), mp_context=get_context("spawn")) as pool:
        return _collect(all_jobs, {i: pool.submit(distill_worker, all_jobs[i]) for i in order})


def _collect(all_jobs: list[dict], futures: dict) -> list[dict]:
    """Every future's result; when workers were lost, one error naming all the intervals they took with them."""
    results, lost, first = {}, [], None
    for i in range(len(all_jobs)):
        try:
            results[i] = futures[i].result()
        except Exception as err:
            if not _lost(err):
                for f in futures.values():
                    f.cancel()
                raise
            lost.append(all_jobs[i])
            first = first or err
    if lost:
        names = ", ".join(f"{j['kind']} {' '.join(interval_name(tuple(iv)) for iv in j['intervals'])}" for j in lost)
        raise WorkerLostError(f"a worker was lost while training the student(s) of {names} "
                              f"({type(first).__name__}: {first}); no student was written: run it again") from first
    return [results[i] for i in range(len(all_jobs))]
