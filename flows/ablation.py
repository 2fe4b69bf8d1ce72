"""The order ablation flow: the six orders of prune / quantize / distill, run concurrently.

DVC decides, Prefect runs. Stages upstream of the orders (prepare, train) and the final report
are reproduced one by one with `dvc repro --single-item`, as in the PQD flow. The order stages
(`ablation@pqd`, ...) are independent, but `dvc repro` holds the repository lock, so: DVC names
the order stages that changed (`Repo.status`), Prefect runs their commands concurrently as
subprocesses on its task runner (threads, or a Dask cluster when DISTILLERY_DASK_ADDRESS is set),
then each finished stage is recorded in dvc.lock with `dvc commit -f`, one at a time. The lock
comes out as `dvc repro` would write it, and a second run finds nothing changed.

On a Dask cluster the workers see this project at the same path and run the same environment with
the project on PYTHONPATH; the flow hands them its MLflow settings, so each order's run lands under
this run's parent whatever the worker's own environment says. A worker that dies mid-order takes
the order's stage process with it (Linux), so no orphan keeps writing the order's outputs. The
scheduler then runs the order again on another worker, up to its `distributed.scheduler.allowed-failures`
(3 by default): a lost machine is what that retry is for, and it is safe, as the stage starts from an
empty output folder. Past that, and when the stage process itself is killed (the out-of-memory
killer: the same order would meet the same limit again), the order fails with a message that names
it; the orders that finished are committed, and the next run executes only the missing ones.
"""
from __future__ import annotations

import concurrent.futures
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

from prefect import flow, get_run_logger, task
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from flows.dvc_stages import EXECUTED, SKIPPED, lineage_tags, lock_entry, run_stage, stage_order, tag_stage_run
from flows.pipeline import attach_reports, log_outcome, recipe_run
from distillery.core import tracking
from distillery.core.params import load_params
from distillery.core.errors import DistilleryError

REPORT_STAGE = "ablation_report"
ORDER_PREFIX = "ablation@"
DASK_ENV = "DISTILLERY_DASK_ADDRESS"
# The flow's settings that decide where a stage's record lands and how it reports errors: a Dask worker started
# with another environment must still record under this run's parent. Credentials stay in the workers' own.
FLOW_SETTINGS = ("MLFLOW_TRACKING_URI", tracking.EXPERIMENT_ENV, "DISTILLERY_DEBUG", *tracking.QUIET_ENV)
RERUN = "run `distillery run ablation` again: the orders that finished are reused, only the missing ones run"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


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


def die_with_this_thread() -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel SIGKILL the stage process when the thread that started it dies (Linux).

    That thread waits for the stage to end, so only its process dying (a killed Dask worker) fires the signal;
    otherwise the stage would run on as an orphan, writing the order's outputs while the scheduler runs the same
    order elsewhere. prctl is looked up here: between fork and exec the child makes only the one call.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)
    return arm


@task(task_run_name="{stage}", retries=0)
def run_order_stage(root: Path, stage: str, cmd: str, parent_run_id: str, threads: int,
                    settings: dict[str, str]) -> str:
    """Run one order stage's DVC command as a subprocess (no DVC lock held), its MLflow run under the parent.

    The command is a plain one (`python -m tasks.ablation <order>`), run without a shell so that the stage
    process is this one's child and dies with it.
    """
    logger = get_run_logger()
    env = {**os.environ, **settings, tracking.PARENT_ENV: parent_run_id, "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    logger.info("%s: running `%s` with %d thread(s) on %s, pid %d", stage, cmd, threads, socket.gethostname(),
                os.getpid())
    proc = subprocess.run(shlex.split(cmd), cwd=root, env=env, capture_output=True, text=True,
                          preexec_fn=die_with_this_thread())
    if proc.returncode < 0:
        raise DistilleryError(f"{stage}: its stage process (`{cmd}`) was killed by {signal.Signals(-proc.returncode).name} "
                              f"on {socket.gethostname()} before it finished: by the out-of-memory killer (see "
                              f"`dmesg`) or by someone; nothing of it was recorded in dvc.lock; {RERUN}")
    if proc.returncode != 0:
        raise DistilleryError(f"{stage}: `{cmd}` failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    logger.info("%s: done\n%s", stage, "\n".join(line for line in proc.stdout.splitlines() if "ablation@" in line))
    return EXECUTED


def cluster_error(future: PrefectFuture) -> Exception | None:
    """What ended a Dask future without a Prefect state (a worker died, the scheduler went away); None on threads,
    whose task always returns its state, a failed one included."""
    wrapped = future.wrapped_future
    if isinstance(wrapped, concurrent.futures.Future):
        return None
    try:
        wrapped.result()
    except Exception as err:  # noqa: BLE001  (whatever the cluster raised is reported, with its type)
        return err
    return None


def cluster_failure(stage: str, err: Exception) -> str:
    """The message for an order the Dask cluster could not finish: which order, what happened, what to do."""
    from distributed import KilledWorker
    if isinstance(err, KilledWorker):
        deaths = err.allowed_failures + 1
        return (f"{stage}: the Dask worker running it ({err.last_worker.address}) died before the order finished, "
                f"and its stage process with it; the scheduler gave up after {deaths} worker death(s) "
                f"(distributed.scheduler.allowed-failures = {err.allowed_failures}); nothing of it was recorded in "
                f"dvc.lock; {RERUN} (if workers keep dying, read their logs: memory limits, lost machines)")
    return (f"{stage}: the Dask cluster at {os.environ.get(DASK_ENV)} could not run it ({type(err).__name__}: {err}); "
            "nothing of it was recorded in dvc.lock; check that its workers see this project at the same path and run "
            f"the same environment with the project on PYTHONPATH, then {RERUN}")


def mark_crashed(future: PrefectFuture, message: str) -> None:
    """A task whose worker died cannot report its end: record it as Crashed, with why, for the Prefect UI."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed
    try:
        get_client(sync_client=True).set_task_run_state(future.task_run_id, Crashed(message=message), force=True)
    except ObjectNotFound:  # the worker died before the task run was created
        pass


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
    settings = {k: os.environ[k] for k in FLOW_SETTINGS if k in os.environ}
    futures = {s: run_order_stage.submit(root, s, commands[s], parent_run_id, threads, settings) for s in changed}
    failures = []
    for stage, future in futures.items():  # commit in DVC's order, each as soon as it and those before it are done
        future.wait()
        err = cluster_error(future)
        if err is not None:
            failures.append(cluster_failure(stage, err))
            mark_crashed(future, failures[-1])
            continue
        state = future.state
        if not state.is_completed():
            err = state.result(raise_on_failure=False)  # our own message, without Prefect's wrapping of it
            failures.append(str(err) if isinstance(err, DistilleryError) else f"{stage}: {state.message}")
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
