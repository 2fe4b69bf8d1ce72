"""Stage `depth_distill`: PPCL step 3, one student block per interval, intervals trained concurrently.

The teacher is traced once on a seeded set of noisy inputs; every interval (u, v) that a menu
variant needs gets a student initialised from its middle block and trained to map the TEACHER's
h_u to its h_v (L2-normalised MSE on both streams). Intervals do not depend on each other, so they
train at the same time in worker processes (`depth_distill.workers`, 0 = all cores), and each is
saved to its own file, `models/ppcl/students/<u>_<v>.pt`. The ablation's students (CKA-threshold
intervals, trained sequentially: each fed by the model with the earlier students in place) go to
`models/ppcl/sequential/<u>_<v>.pt`.

With DISTILLERY_DASK_ADDRESS set (the ablation flow's variable: a Dask scheduler whose workers share this
project's filesystem and have it on PYTHONPATH) and a CPU device, the jobs run on that cluster's workers instead
of local processes; a worker lost mid-job fails the stage (naming the intervals) before any student is saved.
"""
from __future__ import annotations

import json
import os
import time

from distillery.core.artifacts import write_json
from distillery.core.params import load_section
from distillery.core.errors import DistilleryError, run_stage
from distillery.ppcl.source import load_inputs_file, load_teacher
from distillery.ppcl.students import (WorkerLostError, interval_name, jobs, payload_bytes, run_jobs,
                                      save_student)
from tasks.paths import INTERVALS, PPCL_INPUTS as INPUTS, PPCL_TEACHER as TEACHER, SEQUENTIAL, STUDENTS, metrics

METRICS = metrics("ppcl_depth_distill")
DASK_ENV = "DISTILLERY_DASK_ADDRESS"


def reset(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.glob("*.pt"):
        f.unlink()


def dask_client(address: str):
    from distributed import Client
    try:
        return Client(address, set_as_default=False, timeout=60)
    except OSError as err:
        raise DistilleryError(f"{DASK_ENV}={address}: no Dask scheduler answered ({err}); start one or unset "
                              f"{DASK_ENV} to train in local processes") from err


def main() -> None:
    from distillery.core import tracking
    from distillery.ppcl.adapter import trace
    from distillery.ppcl.hf import adapter_for
    from distillery.ppcl.depth import DistillConfig
    from distillery.ppcl.hf import resolve_device
    cfg = load_section("depth_distill")
    device = resolve_device(load_section("ppcl_teacher").device)
    chosen = json.loads(INTERVALS.read_text())
    teacher, _ = load_teacher(TEACHER)
    adapter = adapter_for(teacher)
    calibration, _, _ = load_inputs_file(INPUTS)
    students = [tuple(iv) for iv in chosen["students"]]
    sequential = [tuple(iv) for iv in chosen["ablation"]["intervals"]] if cfg.sequential else []
    workers = 1 if device.type == "cuda" else cfg.workers or os.cpu_count() or 1  # one GPU: one process
    dcfg = DistillConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, loss=cfg.loss, seed=cfg.seed)
    with tracking.stage_run("depth_distill", cfg.model_dump()):
        data = calibration.take(slice(0, cfg.data_size)).to(device)
        tr = trace(teacher.to(device), adapter, data)
        all_jobs = jobs(TEACHER, tr, students, sequential, dcfg, root=os.getcwd())
        print(f"depth_distill: {len(all_jobs)} jobs carry {sum(map(payload_bytes, all_jobs)) / 2**20:.1f} MiB "
              f"of hidden states")
        address = os.environ.get(DASK_ENV) if device.type == "cpu" else None
        client = dask_client(address) if address else None
        executor = f"dask {address}" if client else "local"
        t0 = time.perf_counter()
        try:
            if client:
                workers = len(client.nthreads())  # worker processes
            try:
                results = run_jobs(all_jobs, workers, client.get_executor(pure=False) if client else None)
            except WorkerLostError as err:
                raise WorkerLostError(f"{err} (dvc repro depth_distill)") from err.__cause__
        finally:
            if client:
                client.close()
        seconds = time.perf_counter() - t0
        reset(STUDENTS)
        reset(SEQUENTIAL)
        record = {"seconds": seconds, "workers": workers, "executor": executor, "independent": {}, "sequential": {}}
        for res in results:
            folder = STUDENTS if res["kind"] == "interval" else SEQUENTIAL
            kind = "independent" if res["kind"] == "interval" else "sequential"
            for iv, (state, initial, final) in res["results"].items():
                path = folder / f"{interval_name(iv)}.pt"
                save_student(path, state, iv, initial, final, kind)
                record[kind][interval_name(iv)] = {"loss_initial": initial, "loss_final": final}
        (STUDENTS / "manifest.json").write_text(json.dumps(sorted(record["independent"])) + "\n")
        (SEQUENTIAL / "manifest.json").write_text(json.dumps(sorted(record["sequential"])) + "\n")
        write_json(METRICS, record)
        tracking.log_metrics({"seconds": seconds, "workers": workers,
                              **{f"{k}.{iv}.loss_final": r["loss_final"] for k in ("independent", "sequential")
                                 for iv, r in record[k].items()}})
        for k in ("independent", "sequential"):
            for iv, r in record[k].items():
                print(f"depth_distill: {k:<11} {iv:>6}: loss {r['loss_initial']:.4f} -> {r['loss_final']:.4f}")
        print(f"depth_distill: {len(results)} jobs on {workers} workers ({executor}) in {seconds:.0f} s -> "
              f"{STUDENTS}, {SEQUENTIAL}")


if __name__ == "__main__":
    run_stage(main)
