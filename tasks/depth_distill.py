"""Stage `depth_distill`: PPCL step 3, one student block per interval, intervals trained concurrently.

The teacher is traced once on a seeded set of noisy inputs; every interval (u, v) that a menu
variant needs gets a student initialised from its middle block and trained to map the TEACHER's
h_u to its h_v (L2-normalised MSE on both streams). Intervals do not depend on each other, so they
train at the same time in worker processes (`depth_distill.workers`, 0 = all cores), and each is
saved to its own file, `models/ppcl/students/<u>_<v>.pt`. The ablation's students (CKA-threshold
intervals, trained sequentially: each fed by the model with the earlier students in place) go to
`models/ppcl/sequential/<u>_<v>.pt`.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from distillery.core.artifacts import write_json
from distillery.core.params import load_section
from distillery.core.errors import run_stage
from distillery.models import load_model
from distillery.ppcl.digits import diffusion_data
from distillery.ppcl.students import distill_worker, interval_name
from tasks.paths import INTERVALS, PPCL_TEACHER as TEACHER, PREPARED, SEQUENTIAL, STUDENTS

METRICS = "metrics/ppcl_depth_distill.json"


def jobs(tr, students, sequential, cfg) -> list[dict]:
    """One job per independent interval, plus one for the sequential chain; each carries only its states."""
    out = [{"kind": "interval", "teacher": str(TEACHER), "intervals": [list(iv)], "cond": tr.cond, "cfg": cfg,
            "states": {iv[0]: tr.hidden[iv[0]], iv[1]: tr.hidden[iv[1]]}} for iv in students]
    if sequential:
        need = {0} | {v for _, v in sequential}
        out.append({"kind": "sequential", "teacher": str(TEACHER), "intervals": [list(iv) for iv in sequential],
                    "cond": tr.cond, "cfg": cfg, "states": {i: tr.hidden[i] for i in need}})
    return out


def run_jobs(all_jobs: list[dict], workers: int) -> list[dict]:
    """Jobs in `workers` processes at once (spawned: no OpenMP state forked), or in this one for 1."""
    if workers <= 1 or len(all_jobs) <= 1:
        return [distill_worker(j) for j in all_jobs]
    # longest first: the sequential chain holds several intervals
    order = sorted(range(len(all_jobs)), key=lambda i: -len(all_jobs[i]["intervals"]))
    with ProcessPoolExecutor(max_workers=min(workers, len(all_jobs)), mp_context=get_context("spawn")) as pool:
        futures = {i: pool.submit(distill_worker, all_jobs[i]) for i in order}
        return [futures[i].result() for i in range(len(all_jobs))]


def reset(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.glob("*.pt"):
        f.unlink()


def main() -> None:
    from distillery.core import tracking
    from distillery.ppcl.adapter import MMDIT, trace
    from distillery.ppcl.depth import DistillConfig
    from distillery.ppcl.flow_matching import noisy_inputs
    cfg = load_section("depth_distill")
    chosen = json.loads(INTERVALS.read_text())
    teacher, _ = load_model(TEACHER)
    x, y = diffusion_data(PREPARED, teacher.image_size)
    students = [tuple(iv) for iv in chosen["students"]]
    sequential = [tuple(iv) for iv in chosen["ablation"]["intervals"]] if cfg.sequential else []
    workers = cfg.workers or os.cpu_count() or 1
    dcfg = DistillConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, loss=cfg.loss, seed=cfg.seed)
    with tracking.stage_run("depth_distill", cfg.model_dump()):
        data = noisy_inputs(x, y, cfg.data_size, seed=cfg.seed, caption_dropout=0.1)
        tr = trace(teacher, MMDIT, data)
        t0 = time.perf_counter()
        results = run_jobs(jobs(tr, students, sequential, dcfg), workers)
        seconds = time.perf_counter() - t0
        reset(STUDENTS)
        reset(SEQUENTIAL)
        record = {"seconds": seconds, "workers": workers, "independent": {}, "sequential": {}}
        for res in results:
            folder = STUDENTS if res["kind"] == "interval" else SEQUENTIAL
            kind = "independent" if res["kind"] == "interval" else "sequential"
            for iv, (state, initial, final) in res["results"].items():
                path = folder / f"{interval_name(iv)}.pt"
                save_student_state(path, state, iv, initial, final, kind)
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
        print(f"depth_distill: {len(results)} jobs on {workers} workers in {seconds:.0f} s -> {STUDENTS}, {SEQUENTIAL}")


def save_student_state(path, state: dict, iv, initial: float, final: float, kind: str) -> None:
    from distillery.core.artifacts import atomic_path
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"interval": list(iv), "state_dict": state, "loss_initial": initial, "loss_final": final,
                    "kind": kind}, f)


if __name__ == "__main__":
    run_stage(main)
