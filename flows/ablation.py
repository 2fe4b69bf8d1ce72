"""The order ablation flow: the six orders of prune / quantize / distill, run concurrently.

DVC decides, Prefect runs. Stages upstream of the orders (prepare, train) and the final report
are reproduced one by one with `dvc repro --single-item`, as in the PQD flow. The order stages
(`ablation@pqd`, ...) are independent, but `dvc repro` holds the repository lock, so: DVC names
the order stages that changed (`Repo.status`), Prefect runs their commands concurrently as
subprocesses on its task runner (threads, or a Dask cluster when DISTILLERY_DASK_ADDRESS is set),
then each finished stage is recorded in dvc.lock with `dvc commit -f`, one at a time. The lock
comes out as `dvc repro` would write it, and a second run finds nothing changed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner

from flows.dvc_stages import EXECUTED, SKIPPED, lineage_tags, lock_entry, run_stage, stage_order, tag_stage_run
from flows.pipeline import attach_reports, log_outcome, recipe_run
from distillery.core import tracking
from distillery.core.params import load_params
from distillery.core.errors import DistilleryError

REPORT_STAGE = "ablation_report"
ORDER_PREFIX = "ablation@"
DASK_ENV = "DISTILLERY_DASK_ADDRESS"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def task_runner():
    """A Dask cluster when DISTILLERY_DASK_ADDRESS names one (workers share this project path), else threads."""
    address = os.environ.get(DASK_ENV)
    if address:
        from prefect_dask import DaskTaskRunner
        return DaskTaskRunner(address=address)
    return ThreadPoolTaskRunner(max_workers=cores())


def changed_stages(root: Path, stages: list[str]) -> list[str]:
    """The stages among `stages` whose deps, params or outs differ from dvc.lock (DVC's verdict)."""
    from dvc.repo import Repo
    if not stages:
        return []
    with Repo(str(root)) as repo:
        status = repo.status(targets=stages)
    return [s for s in stages if s in status]


def stage_commands(root: Path, stages: list[str]) -> dict[str, str]:
    from dvc.repo import Repo
    with Repo(str(root)) as repo:
        by_name = {s.addressing: s for s in repo.index.stages}
        return {s: by_name[s].cmd for s in stages}


def commit_stage(root: Path, stage: str) -> None:
    """Record a stage whose command ran outside `dvc repro` in dvc.lock (and its outs in the cache)."""
    from dvc.repo import Repo
    with Repo(str(root)) as repo:
        repo.commit(stage, force=True)


@task(task_run_name="{stage}", retries=0)
def run_order_stage(root: Path, stage: str, cmd: str, parent_run_id: str, threads: int) -> str:
    """Run one order stage's DVC command as a subprocess (no DVC lock held), its MLflow run under the parent."""
    logger = get_run_logger()
    env = {**os.environ, tracking.PARENT_ENV: parent_run_id, "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    logger.info("%s: running `%s` with %d thread(s)", stage, cmd, threads)
    proc = subprocess.run(cmd, shell=True, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DistilleryError(f"{stage}: `{cmd}` failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    logger.info("%s: done\n%s", stage, "\n".join(line for line in proc.stdout.splitlines() if "ablation@" in line))
    return EXECUTED


def run_orders(root: Path, stages: list[str], parent_run_id: str) -> dict[str, str]:
    """Run the changed order stages concurrently, then commit each finished one to dvc.lock, serially."""
    logger = get_run_logger()
    changed = changed_stages(root, stages)
    outcome = {s: SKIPPED for s in stages if s not in changed}
    for s in outcome:
        logger.info("%s: unchanged (deps, params and outs match dvc.lock), not re-executed", s)
    if not changed:
        return outcome
    commands = stage_commands(root, changed)
    threads = max(1, cores() // len(changed)) if not os.environ.get(DASK_ENV) else 1
    futures = {s: run_order_stage.submit(root, s, commands[s], parent_run_id, threads) for s in changed}
    failures = []
    for stage, future in futures.items():  # commit in DVC's order, each as soon as it and those before it are done
        future.wait()
        state = future.state
        if not state.is_completed():
            failures.append(f"{stage}: {state.message}")
            continue
        commit_stage(root, stage)
        tag_stage_run(parent_run_id, stage, lineage_tags(lock_entry(root, stage)))
        outcome[stage] = EXECUTED
    if failures:
        raise DistilleryError("order stages failed (the others are recorded in dvc.lock):\n" + "\n".join(failures))
    return {s: outcome[s] for s in stages}


@flow(name="distillery-ablation", flow_run_name="ablation", log_prints=True)
def ablation(root: str = ".") -> dict[str, str]:
    """Every order of prune / quantize / distill from one teacher, concurrently; then the side-by-side report."""
    root_path = Path(root).resolve()
    os.chdir(root_path)
    load_params(root_path / "params.yaml")
    stages = stage_order(root_path, [REPORT_STAGE])
    orders = [s for s in stages if s.startswith(ORDER_PREFIX)]
    upstream = [s for s in stages if s not in orders and s != REPORT_STAGE]
    with recipe_run("ablation", root_path) as (parent_run_id, outcome):
        for stage in upstream:
            outcome[stage] = run_stage(root_path, stage, parent_run_id)
        outcome.update(run_orders(root_path, orders, parent_run_id))
        outcome[REPORT_STAGE] = run_stage(root_path, REPORT_STAGE, parent_run_id)
        attach_reports("ablation", root_path)
    log_outcome(outcome)
    return outcome


def ablation_flow():
    """The flow with its task runner chosen from the environment at call time."""
    return ablation.with_options(task_runner=task_runner())
