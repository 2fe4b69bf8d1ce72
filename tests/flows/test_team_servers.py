"""The same project on team servers, all real and on 127.0.0.1: an MLflow tracking server, a Prefect server
with a process worker running the deployed pipeline, an S3-compatible DVC remote (moto), and `make stack`.

One smoke project and one pair of servers serve the module: the first test runs the pipeline through the
`distillery` command against both servers; the others read what it recorded, push and pull its
checkpoints, and run it again through a deployment, as a team would.
"""
import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import boto3
import httpx
import mlflow.artifacts
import psutil
import pytest
import yaml
from mlflow import MlflowClient
from repos import GIT_ENV
from servers import BIN, HOST, QUIET, Server, free_port, kill_tree, mlflow_server, moto_server, prefect_env, \
    prefect_server, running, tree, wait_for
from test_pipeline import PQD_ORDER, make_project, set_params

ROOT = Path(__file__).resolve().parents[2]
SMOKE = {  # besides test_pipeline's TINY: one peer, no counterpart, no profiler; minutes on two cores
    "counterpart": {"enabled": False},
    "baselines": {"peers": {"ort_u8s8": True, "ort_s8s8": False, "nncf": False, "olive": False}},
    "benchmark": {"warmup": 2, "runs": 20, "threads": [1], "batch_runs": 3, "profile_runs": 0},
}
DEPLOYMENT = "distillery-pipeline/pqd"
POOL = "distillery"  # schedules.yaml's work_pool
S3 = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

pytestmark = pytest.mark.slow


def sh(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run a command; its output, or a failure that shows the output's tail. Past `timeout`, or when the test is
    interrupted, the command and everything it started (DVC's stage processes) are stopped."""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        kill_tree(tree(proc.pid))
    assert proc.returncode == 0, f"{' '.join(map(str, args))} exited {proc.returncode}:\n{(stdout + stderr)[-5000:]}"
    return stdout


def git(root: Path, *args: str) -> str:
    return sh(["git", *args], root, {**os.environ, **GIT_ENV})


class Team:
    """The servers of the module and the environment a team member exports to use them."""

    def __init__(self, mlflow: Server, prefect: Server, home: Path):
        self.mlflow, self.prefect = mlflow, prefect
        self.env = {**os.environ, **QUIET, **prefect_env(home, prefect.url), "MLFLOW_TRACKING_URI": mlflow.url,
                    "PREFECT_LOGGING_LEVEL": "INFO"}
        self.env.pop("DISTILLERY_ROOT", None)

    def distillery(self, *args: str, cwd: Path, timeout: float = 600) -> str:
        """The `distillery` command, as a user runs it with the team's variables exported."""
        return sh([str(BIN / "distillery"), *args], cwd, self.env, timeout)

    def mlflow_client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.mlflow.url, registry_uri=self.mlflow.url)  # not the global one

    @contextlib.contextmanager
    def prefect_client(self):
        """A Prefect client of the server; this process's settings point at it meanwhile."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings
        with temporary_settings({PREFECT_API_URL: self.prefect.url}), get_client(sync_client=True) as client:
            yield client


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Iterator[Team]:
    where = tmp_path_factory.mktemp("servers")
    scheduler = {"PREFECT_UI_ENABLED": "false",  # API only: starts faster
                 "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}  # the nightly run is scheduled at once
    with mlflow_server(where / "mlflow") as mlflow, prefect_server(where / "prefect", **scheduler) as prefect:
        yield Team(mlflow, prefect, where / "prefect")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The pipeline's smoke copy, with the flows, schedules and ignore list a team's checkout has."""
    root = make_project(tmp_path_factory.mktemp("team") / "p")
    shutil.copytree(ROOT / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("schedules.yaml", ".gitignore", "Makefile"):
        shutil.copy(ROOT / name, root / name)
    set_params(root, **SMOKE)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "team checkout")
    return root


@pytest.fixture(scope="module")
def first_run(team, project) -> dict[str, list[str]]:
    """`distillery run pqd` with MLFLOW_TRACKING_URI and PREFECT_API_URL exported: {executed, reused}."""
    out = team.distillery("run", "pqd", "--root", str(project), cwd=project.parent, timeout=1500)
    line = next(line for line in out.splitlines() if line.startswith("pqd: executed"))
    executed, reused = line.removeprefix("pqd: executed ").split("; reused ")
    return {"executed": executed.split(", "), "reused": [] if reused == "none" else reused.split(", ")}


def lock(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def pipeline_runs(client: MlflowClient, filter_string: str = "") -> list:
    exp = client.get_experiment_by_name("distillery")
    query = "tags.`distillery.kind` = 'pipeline'" + (f" and {filter_string}" if filter_string else "")
    return client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"])


# --- 1. the MLflow tracking server ---------------------------------------------------------------------------

def test_a_pipeline_run_records_runs_metrics_and_registry_versions_on_the_mlflow_server(team, project, first_run,
                                                                                      monkeypatch):
    assert first_run == {"executed": PQD_ORDER, "reused": []}
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()  # all of it on the server

    client = team.mlflow_client()
    exp = client.get_experiment_by_name("distillery")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # uploaded through the server, not to a shared disk
    parent, = pipeline_runs(client)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["stages.executed"] == ",".join(first_run["executed"])
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags["distillery.stage"]: r for r in children}
    assert set(by_stage) == set(first_run["executed"])
    assert all(r.info.status == "FINISHED" for r in children)
    assert by_stage["benchmark"].data.metrics["teacher.threads_1.p50_ms"] > 0
    assert 0 < by_stage["evaluate"].data.metrics["distilled.accuracy"] <= 1
    outs = {o["path"]: o["md5"] for o in lock(project)["export"]["outs"]}
    assert by_stage["export"].data.tags["dvc.outs.models/teacher.fp32.onnx"] == outs["models/teacher.fp32.onnx"]
    assert client.list_artifacts(parent.info.run_id, "reports")  # the report, uploaded through the proxy

    versions = client.search_model_versions("name = 'distillery-pqd'")
    assert {v.tags["distillery.model"] for v in versions} >= {"teacher", "distilled"}
    for v in versions:
        assert v.tags["distillery.parent_run_id"] == parent.info.run_id and v.tags["dvc.md5"]
    champion = client.get_model_version_by_alias("distillery-pqd", "champion")
    # a models:/ URI resolves through this process's global tracking and registry URIs, which another test module
    # may have pointed at a SQLite file: point them at the server for this test only (monkeypatch restores them)
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils
    monkeypatch.setattr(tracking_utils, "_tracking_uri", team.mlflow.url)
    monkeypatch.setattr(registry_utils, "_registry_uri", team.mlflow.url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.mlflow.url)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", team.mlflow.url)
    files = mlflow.artifacts.download_artifacts(f"models:/distillery-pqd/{champion.version}",
                                                dst_path=str(project.parent / "dl"))
    assert any(p.suffix == ".onnx" for p in Path(files).rglob("*"))  # the registered file comes back from the server

    with team.prefect_client() as prefect:  # the flow run landed on the Prefect server too
        flow_run = prefect.read_flow_run(parent.data.tags["prefect.flow_run_id"])
    assert flow_run.name == "pqd" and flow_run.state.is_completed()


def test_lineage_verify_and_report_read_the_mlflow_server(team, project, first_run):
    client = team.mlflow_client()
    champion = client.get_model_version_by_alias("distillery-pqd", "champion")
    path = champion.tags["dvc.path"]
    producing = champion.tags["distillery.producing_run_id"]
    out = team.distillery("lineage", "distillery-pqd", cwd=project)
    assert f"registered model distillery-pqd version {champion.version} -> {path}" in out
    assert f"MLflow run {producing}" in out and producing in {r.info.run_id for r in client.search_runs(
        [client.get_experiment_by_name("distillery").experiment_id])}

    assert "ok:" in team.distillery("verify", "models:/distillery-pqd@champion", cwd=project)
    assert "ok:" in team.distillery("verify", cwd=project)

    team.distillery("report", "--out", "team_reports", cwd=project)
    import pandas as pd
    table = pd.read_csv(project / "team_reports/summary.csv")
    assert {"teacher", "distilled"} <= set(table["model"]) and (table["p50_ms_1t"].dropna() > 0).all()


def cached_outs(root: Path) -> dict[str, str]:
    """{path: md5} of every output in dvc.lock that DVC caches (and pushes): checkpoints, models, data, reports."""
    from dvc.repo import Repo
    with Repo(str(root)) as repo:
        return {o.def_path: o.hash_info.value for o in repo.index.outs
                if o.use_cache and o.hash_info and o.hash_info.value}


# --- 3. an S3-compatible DVC remote ----------------------------------------------------------------------------

def test_every_checkpoint_goes_to_an_s3_remote_and_a_fresh_clone_pulls_it_and_reproduces_nothing(
        team, project, first_run, tmp_path):
    env = {**team.env, **S3}
    with moto_server(tmp_path) as s3:
        bucket = boto3.resource("s3", endpoint_url=s3.url, aws_access_key_id=S3["AWS_ACCESS_KEY_ID"],
                                aws_secret_access_key=S3["AWS_SECRET_ACCESS_KEY"],
                                region_name=S3["AWS_DEFAULT_REGION"]).Bucket("team")
        bucket.create()
        dvc = [sys.executable, "-m", "dvc"]
        sh([*dvc, "remote", "add", "-d", "s3remote", "s3://team/distillery"], project, env)
        sh([*dvc, "remote", "modify", "s3remote", "endpointurl", s3.url], project, env)
        sh([*dvc, "push"], project, env)
        assert "in sync" in sh([*dvc, "status", "--cloud"], project, env)
        stored = {"".join(obj.key.split("/")[-2:]) for obj in bucket.objects.all()}  # files/md5/ab/cdef...: abcdef...
        outs = cached_outs(project)
        assert len(outs) >= 10 and set(outs.values()) <= stored
        git(project, "add", "-A")  # dvc.lock, metrics, the remote's config: what a team commits after a run
        git(project, "commit", "-qm", "pqd run; s3 remote")

        clone = tmp_path / "clone"
        git(tmp_path, "clone", "-q", str(project), str(clone))
        assert not [path for path in outs if (clone / path).exists()]
        sh([*dvc, "pull", "--with-deps", "benchmark"], clone, env)  # the pqd recipe's; a bare `dvc pull` also
        # tries the outputs of recipes never run here (ppcl, ablation), and exits 1 for want of them
        assert cached_outs(clone) == outs and all((clone / path).exists() for path in outs)
    assert "ok:" in team.distillery("verify", cwd=clone)
    out = sh([*dvc, "repro", "benchmark"], clone, env)
    assert "Running stage" not in out and ("didn't change" in out or "up to date" in out), out


# --- 2. a Prefect server, a work pool and a worker running the real pipeline -----------------------------------

@pytest.fixture(scope="module")
def deployed(team, project) -> str:
    out = team.distillery("deploy", "--root", str(project), cwd=project)
    assert f"work pool {POOL!r}" in out
    return DEPLOYMENT


@pytest.fixture(scope="module")
def worker(team, deployed, tmp_path_factory) -> Iterator[Server]:
    """`prefect worker start` on the process pool, in a folder of its own: the deployment says where the code is."""
    where = tmp_path_factory.mktemp("worker")
    cmd = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--name", "team-worker"]
    with running("prefect worker", cmd, where / "worker.log", cwd=where,
                 env={**team.env, "PREFECT_WORKER_QUERY_SECONDS": "1"}) as proc:
        yield proc


def trigger(team: Team, worker: Server, seconds: float = 900):
    """Run the deployment now, wait until the worker finishes it; (flow run, {task: state name})."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    with team.prefect_client() as client:
        run = run_deployment(DEPLOYMENT, timeout=0)
        done = wait_for(lambda: (r := client.read_flow_run(run.id)).state.is_final() and r, seconds,
                        f"flow run {run.id} final", worker, team.prefect, every=2)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    assert done.state.is_completed(), f"{done.state}\nworker log:\n{worker.log_tail()}"
    return done, {t.name: t.state.name for t in tasks}


def test_the_servers_scheduler_creates_the_nightly_run_of_the_deployment(team, deployed):
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    with team.prefect_client() as client:
        deployment = client.read_deployment_by_name(deployed)
        assert deployment.work_pool_name == POOL
        assert [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules] == [("0 2 * * *", "UTC")]
        scheduled = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))
        runs = wait_for(lambda: client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])), flow_run_filter=scheduled),
            120, "a scheduled run of the nightly cron", team.prefect, every=1)
    nightly = min(runs, key=lambda r: r.expected_start_time)
    assert nightly.auto_scheduled and (nightly.expected_start_time.hour, nightly.expected_start_time.minute) == (2, 0)


def test_a_worker_runs_the_deployed_pipeline_and_the_task_states_say_what_dvc_skipped(team, project, worker):
    set_params(project, benchmark={"runs": 25})  # only benchmark reads it: the rest is DVC's to skip
    flow_run, states = trigger(team, worker)
    assert flow_run.name == "pqd" and flow_run.parameters == {"recipe": "pqd", "root": str(project)}
    assert set(states) == set(PQD_ORDER), states
    assert {s for s, state in states.items() if state == "Completed"} == {"benchmark"}, states
    assert {state for s, state in states.items() if s != "benchmark"} == {"Skipped"}, states
    parent, = pipeline_runs(team.mlflow_client(), f"tags.`prefect.flow_run_id` = '{flow_run.id}'")
    assert parent.data.tags["stages.executed"] == "benchmark"  # the worker logged to the MLflow server

    flow_run, states = trigger(team, worker)
    assert set(states.values()) == {"Skipped"}, states
    parent, = pipeline_runs(team.mlflow_client(), f"tags.`prefect.flow_run_id` = '{flow_run.id}'")
    assert parent.data.tags["stages.executed"] == "none"


# --- 5. `make stack` / `make stack-down` --------------------------------------------------------------------

def test_make_stack_serves_a_distillery_run_from_localhost_and_stack_down_leaves_no_process(project, first_run):
    """As a new user tries it: `make stack`, export what it prints, `distillery run pqd`, look in both servers."""
    mlflow_port, prefect_port = free_port(), free_port()
    venv = Path(sys.executable).parent.parent
    make = ["make", "-s", f"VENV={venv}", "-o", f"{venv}/.installed"]  # this venv as it is: no install in the copy
    env = {**os.environ, **QUIET, "MLFLOW_PORT": str(mlflow_port), "PREFECT_PORT": str(prefect_port)}
    stack = project / ".stack"
    try:
        out = sh([*make, "stack"], project, env, timeout=400)
        assert f"export MLFLOW_TRACKING_URI=http://{HOST}:{mlflow_port}" in out
        assert f"export PREFECT_API_URL=http://{HOST}:{prefect_port}/api" in out
        assert httpx.get(f"http://{HOST}:{mlflow_port}/health").status_code == 200
        assert httpx.get(f"http://{HOST}:{prefect_port}/api/health").status_code == 200
        workers = httpx.post(f"http://{HOST}:{prefect_port}/api/work_pools/{POOL}/workers/filter", json={}).json()
        assert [w["status"] for w in workers] == ["ONLINE"]
        pids = {name: int((stack / f"{name}.pid").read_text().split()[0]) for name in ("mlflow", "prefect", "worker")}
        procs = [p for pid in pids.values() for p in tree(pid)]
        listening = [c.laddr for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN
                     and c.pid in {p.pid for p in procs}]
        assert {a.port for a in listening} >= {mlflow_port, prefect_port}
        assert {a.ip for a in listening} == {HOST}, listening  # nothing on another interface

        exported = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines() if line.startswith("export "))
        user = {k: v for k, v in {**os.environ, **QUIET, **exported}.items() if k != "DISTILLERY_ROOT"}
        assert "pqd: executed nothing" in sh([str(BIN / "distillery"), "run", "pqd"], project, user)
        parent, = pipeline_runs(MlflowClient(exported["MLFLOW_TRACKING_URI"]))
        flow_run = httpx.get(f"{exported['PREFECT_API_URL']}/flow_runs/{parent.data.tags['prefect.flow_run_id']}").json()
        assert flow_run["name"] == "pqd" and flow_run["state"]["type"] == "COMPLETED"

        assert "already running" in sh([*make, "stack"], project, env, timeout=60)  # a second `make stack` is harmless
        assert {n: int((stack / f"{n}.pid").read_text().split()[0]) for n in pids} == pids

        assert sh([*make, "stack-down"], project, env, timeout=120).count("stopped") == 3
        assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for port in (mlflow_port, prefect_port):
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{HOST}:{port}/")
        assert sh([*make, "stack-down"], project, env, timeout=60).count("not running") == 3
    finally:
        for pid_file in stack.glob("*.pid"):  # a failed assertion above: stop whatever is left
            kill_tree(tree(int(pid_file.read_text().split()[0])))
