"""The ablation on a real Dask cluster: `dask scheduler` and `dask worker` processes on 127.0.0.1, started as the
README starts them. Each order runs on a worker process and is recorded by DVC and MLflow as in the threaded run;
a worker killed mid-order takes its stage process with it, Dask runs the order again on another worker, and when
that one is killed too the order fails with a message naming it; the next run executes only that order.

The scheduler allows one retry (`distributed.scheduler.allowed-failures = 1`; 3 by default), so two deaths are
final; the workers know neither the flow's MLflow store (outside the project, as a team's tracking server would be)
nor the project's code but through PYTHONPATH.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

from repos import tracked_in
from test_pipeline import ROOT, dvc, make_project, set_params

pytestmark = pytest.mark.slow
HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
LOCAL_HTTP = ["--dashboard-address", f"{HOST}:0"]  # else each binds an HTTP port on 0.0.0.0, --no-dashboard or not
ORDERS = ["pqd", "qpd", "dqp"]
ABLATION = {"prune_epochs": 1, "qat_epochs": 1, "kd_epochs": 1, "seeds": 1, "calibration_size": 64,
            "warmup": 2, "runs": 20, "orders": {o: {} for o in ORDERS}}


class Cluster:
    """A scheduler and two single-thread workers, each a process of its own; closed even when a test fails."""

    def __init__(self, home: Path):
        self.home, self.procs, self.logs = home, [], []
        self.env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DISTILLERY_DASK_ADDRESS")}
        self.env |= {"PYTHONPATH": str(ROOT),  # the project's code (flows/); its data is the tmp project's
                     "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}

    def start(self) -> str:
        info = self.home / "scheduler.json"
        self.spawn("scheduler", "--host", HOST, "--port", "0", *LOCAL_HTTP, "--scheduler-file", str(info))
        deadline = time.monotonic() + 120
        while not info.exists():
            assert self.procs[0].poll() is None and time.monotonic() < deadline, (self.home / "scheduler.log").read_text()
            time.sleep(0.2)
        self.address = json.loads(info.read_text())["address"]
        self.spawn("worker", self.address, "--host", HOST, "--nworkers", "2", "--nthreads", "1", *LOCAL_HTTP)
        from distributed import Client
        self.client = Client(self.address, set_as_default=False, timeout=120)
        self.wait_for_workers()
        return self.address

    def spawn(self, role: str, *args: str) -> None:
        self.logs.append(open(self.home / f"{role}.log", "ab"))
        self.procs.append(subprocess.Popen([str(BIN / "dask"), role, *args], cwd=self.home, env=self.env,
                                           stdout=self.logs[-1], stderr=subprocess.STDOUT, start_new_session=True))

    def wait_for_workers(self) -> None:
        self.client.wait_for_workers(2, timeout=120)

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> the pid of its process (not its nanny's)."""
        return self.client.run(os.getpid, on_error="ignore")  # a worker dying meanwhile is left out

    def close(self) -> None:
        """Each process group this started (a worker's stage processes included), TERM, then KILL."""
        if getattr(self, "client", None) is not None:
            self.client.close()
        for proc in reversed(self.procs):
            with_group(proc, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with_group(proc, signal.SIGKILL)
                proc.wait(timeout=30)
            with_group(proc, signal.SIGKILL)  # what the leader left behind in its group
        for log in self.logs:
            log.close()


def with_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("dask"))
    try:
        address = c.start()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DISTILLERY_DASK_ADDRESS", address)
            yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def project(tmp_path_factory, harness, cluster):
    home = tmp_path_factory.mktemp("abl-dask")
    root = make_project(home / "p")
    set_params(root, ablation=ABLATION)
    (home / "store").mkdir()
    with tracked_in(root):
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'store/mlflow.db'}"
        yield root


def run(root: Path) -> dict[str, str]:
    from flows.ablation import ablation_flow
    return ablation_flow()(root=str(root))


def executed(outcome: dict[str, str]) -> list[str]:
    return [s for s, o in outcome.items() if o == "executed"]


def pipeline_runs() -> list:
    """The ablation's parent runs, newest first."""
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return mlflow.search_runs(experiment_names=["distillery"], filter_string="tags.`distillery.recipe` = 'ablation' "
                              "and tags.`distillery.kind` = 'pipeline'", order_by=["attributes.start_time DESC"],
                              output_format="list")


def children(parent) -> list:
    return mlflow.search_runs(experiment_names=["distillery"],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", output_format="list")


def lock(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def up_to_date(root: Path, stage: str) -> bool:
    return "up to date" in dvc(root, "status", stage)


def test_each_order_runs_on_a_worker_process_and_is_recorded_as_in_the_threaded_run(project, cluster):
    from distributed import get_task_stream
    with get_task_stream(client=cluster.client) as stream:
        outcome = run(project)
    assert executed(outcome) == ["prepare", "train", *(f"ablation@{o}" for o in ORDERS), "ablation_report"]

    # the three order tasks ran on the cluster's worker processes, none in this one
    workers = cluster.worker_pids()
    ran_on = [t["worker"] for t in stream.data if str(t["key"]).startswith("run_order_stage")]
    assert len(ran_on) == 3 and set(ran_on) <= set(workers), (ran_on, workers)
    assert os.getpid() not in workers.values()
    for proc in cluster.procs:  # the scheduler, the nannies and the workers listen on 127.0.0.1 only
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            assert {c.laddr.ip for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN} <= {HOST}

    # DVC: each order in dvc.lock, its outputs there, nothing changed
    stages = lock(project)
    for order in ORDERS:
        assert f"ablation@{order}" in stages
        assert (project / f"models/ablation/{order}/seed0.int8.onnx").stat().st_size > 0
        assert up_to_date(project, f"ablation@{order}")
    assert "up to date" in dvc(project, "status", "--with-deps", "ablation_report")

    # MLflow: one finished nested run per order under the parent, with the stage's metrics and DVC's md5s
    parent = pipeline_runs()[0]
    assert parent.data.tags["stages.executed"] == ",".join(executed(outcome))
    runs = children(parent)
    for order in ORDERS:
        [stage_run] = [r for r in runs if r.data.tags.get("distillery.stage") == f"ablation@{order}"]
        assert stage_run.info.status == "FINISHED"
        summary = json.loads((project / f"metrics/ablation/{order}.json").read_text())
        expected = {"test_acc_mean": summary["test_acc_mean"], "test_acc_std": summary["test_acc_std"],
                    **{f"seed0.{k}": float(v) for k, v in summary["seeds"]["seed0"].items()
                       if k != "seed" and isinstance(v, (int, float))}}
        assert stage_run.data.metrics == pytest.approx(expected), order
        out = next(o for o in stages[f"ablation@{order}"]["outs"] if o["path"] == f"models/ablation/{order}")
        assert stage_run.data.tags[f"dvc.outs.models/ablation/{order}"] == out["md5"]
    results = [r for r in runs if r.data.tags.get("distillery.kind") == "ablation-result"]
    assert sorted(r.data.tags["ablation.order"] + r.data.tags["ablation.seed"] for r in results) == \
        ["dqp0", "pqd0", "qpd0"]


class Killer(threading.Thread):
    """Each time `order`'s stage process has opened its MLflow run on a worker, SIGKILLs that worker's process
    (`what="worker"`) or the stage process itself (`what="stage"`, as the out-of-memory killer would); `times` times."""

    def __init__(self, cluster: Cluster, order: str, what: str, times: int = 1):
        super().__init__(daemon=True)
        self.cluster, self.order, self.what, self.times = cluster, order, what, times
        self.killed, self.stage_pids, self.workers_ran_it, self.error = [], [], [], None
        self.stage_outlived_worker = False

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 300
            while len(self.killed) < self.times and time.monotonic() < deadline:
                found = self.stage_under(set(self.cluster.worker_pids().values()))
                if found is not None and found[0] not in self.stage_pids and self.stage_run_open(found[0]):
                    stage, worker = found
                    self.stage_pids.append(stage)
                    self.workers_ran_it.append(worker)
                    self.killed.append(worker if self.what == "worker" else stage)
                    os.kill(self.killed[-1], signal.SIGKILL)
                    if self.what == "worker":
                        time.sleep(2)  # the stage of a dead worker dies at once, not when it would have finished
                        self.stage_outlived_worker |= alive(stage)
                time.sleep(0.2)
        except Exception as err:  # reported by the test
            self.error = err

    def stage_under(self, workers: set[int]) -> tuple[int, int] | None:
        """(the order's stage process, the worker process it runs under), once it runs."""
        for p in psutil.process_iter(["cmdline"]):
            if (p.info["cmdline"] or [])[1:] == ["-m", "tasks.ablation", self.order]:
                worker = next((q.pid for q in p.parents() if q.pid in workers), None)
                if worker is not None:
                    return p.pid, worker
        return None

    def stage_run_open(self, pid: int) -> bool:
        """The stage process `pid` has opened its MLflow run: it is well under way."""
        return bool(mlflow.search_runs(experiment_names=["distillery"], output_format="list",
                                       filter_string=f"tags.`distillery.stage` = 'ablation@{self.order}' and "
                                                     f"tags.`distillery.pid` = '{pid}'"))


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run_killing(project: Path, killer: Killer) -> str:
    """Run the flow while `killer` strikes; the flow's error message."""
    killer.start()
    with pytest.raises(Exception) as failed:
        run(project)
    killer.join(timeout=60)
    assert killer.error is None and len(killer.killed) == killer.times, (killer.error, killer.killed)
    return str(failed.value)


def test_a_killed_worker_takes_its_stage_along_dask_retries_once_then_the_order_fails_clearly(project, cluster):
    set_params(project, ablation={"orders": {"pqd": {"kd_epochs": 2}, "qpd": {}, "dqp": {"kd_epochs": 2}}})
    killer = Killer(cluster, "dqp", what="worker", times=2)
    message = run_killing(project, killer)
    assert "ablation@dqp: the Dask worker running it" in message and "died before the order finished" in message, message
    assert "gave up after 2 worker death(s) (distributed.scheduler.allowed-failures = 1)" in message, message
    assert "run `distillery run ablation` again" in message and "ablation@pqd" not in message, message
    assert not killer.stage_outlived_worker  # no orphan writing the order's outputs while Dask runs it elsewhere
    assert len(set(killer.stage_pids)) == 2  # the retry was a new stage process

    stages = lock(project)
    assert stages["ablation@pqd"]["params"]["params.yaml"]["ablation.orders.pqd"] == {"kd_epochs": 2}
    assert stages["ablation@dqp"]["params"]["params.yaml"]["ablation.orders.dqp"] == {}  # the first run's entry
    assert up_to_date(project, "ablation@pqd") and not up_to_date(project, "ablation@dqp")

    runs = children(pipeline_runs()[0])
    by_stage = {r.data.tags.get("distillery.stage"): r for r in runs}
    assert by_stage["ablation@pqd"].info.status == "FINISHED"
    assert [r.info.status for r in runs if r.data.tags.get("distillery.stage") == "ablation@dqp"] == ["KILLED"] * 2
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    with get_client(sync_client=True) as client:
        [task_run] = [t for t in client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(any_=["ablation@dqp"]))) if t.state.message and "Dask worker" in t.state.message]
    assert task_run.state.type.value == "CRASHED"


def test_the_next_run_executes_only_the_order_that_was_killed(project, cluster):
    cluster.wait_for_workers()  # its nanny restarted the killed worker
    assert executed(run(project)) == ["ablation@dqp", "ablation_report"]
    assert lock(project)["ablation@dqp"]["params"]["params.yaml"]["ablation.orders.dqp"] == {"kd_epochs": 2}
    assert "up to date" in dvc(project, "status", "--with-deps", "ablation_report")


def test_a_stage_process_killed_on_a_worker_fails_its_order_with_the_signal(project, cluster):
    set_params(project, ablation={"orders": {"pqd": {"kd_epochs": 2}, "qpd": {"kd_epochs": 2}, "dqp": {"kd_epochs": 2}}})
    message = run_killing(project, Killer(cluster, "qpd", what="stage"))
    assert "ablation@qpd: its stage process (`python -m tasks.ablation qpd`) was killed by SIGKILL" in message, message
    assert "run `distillery run ablation` again" in message, message
    assert not up_to_date(project, "ablation@qpd")
