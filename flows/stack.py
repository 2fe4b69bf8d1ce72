"""`make stack`: the team servers on this machine, to try a team deployment before a platform team runs one.

`python -m flows.stack up` starts, each in the background with its pid file and log under `.stack/`:

- MLflow's tracking server: SQLite store `.stack/mlflow.db`, artifacts under `.stack/mlartifacts`, served
  through the server (clients need no access to the folder);
- a Prefect server, its home (and its own SQLite database) in `.stack/prefect`;
- a Prefect process worker on the project's work pool (schedules.yaml), which runs deployed recipes
  (`distillery deploy`) and logs them to this MLflow server.

All bind 127.0.0.1; ports from MLFLOW_PORT (5000) and PREFECT_PORT (4200). It waits until each answers,
then prints the variables to export. `python -m flows.stack down` stops each one's whole process tree
(Prefect starts every flow run in a session of its own) and is safe to run twice.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import psutil
import typer
import yaml

from distillery.core.tracking import QUIET_ENV
from flows.deploy import SCHEDULES, SchedulesConfig

HOST = "127.0.0.1"  # the try-out stack is private to this machine; a team server sits behind its own proxy
STACK = ".stack"
BIN = Path(sys.executable).parent  # mlflow, prefect: the console scripts of this environment
STARTUP_TIMEOUT = float(os.environ.get("STACK_TIMEOUT", 180))  # seconds; a busy 2-core box needs a minute or more
STOP_GRACE = 15  # seconds between SIGTERM and SIGKILL

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="The team stack on 127.0.0.1: MLflow server, Prefect server and a process worker.")


class StackError(Exception):
    """A server that would not start, or a port already taken."""


@dataclass(frozen=True)
class Service:
    name: str
    cmd: list[str]
    env: dict[str, str]
    ready: Callable[[], bool]  # answers: the server its health URL, the worker its heartbeat on the pool
    port: int | None = None
    port_env: str | None = None  # the variable that moves it


def port(var: str, default: int) -> int:
    value = os.environ.get(var, str(default))
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise StackError(f"{var}={value!r}: not a port number (1-65535)")
    return int(value)


def ports() -> tuple[int, int]:
    """(MLflow's port, Prefect's port), from MLFLOW_PORT and PREFECT_PORT."""
    return port("MLFLOW_PORT", 5000), port("PREFECT_PORT", 4200)


def urls() -> tuple[str, str]:
    """(MLflow tracking URI, Prefect API URL): what clients export."""
    mlflow_port, prefect_port = ports()
    return f"http://{HOST}:{mlflow_port}", f"http://{HOST}:{prefect_port}/api"


def work_pool(root: Path) -> str:
    """The process work pool `distillery deploy` registers on: schedules.yaml's `work_pool`."""
    path = root / SCHEDULES
    raw = yaml.safe_load(path.read_text()) if path.exists() else None
    return (raw or {}).get("work_pool") or SchedulesConfig.model_fields["work_pool"].default


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def taken(port_number: int) -> bool:
    """Something already listens on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((HOST, port_number)) == 0


def worker_online(api: str, pool: str, name: str) -> bool:
    """The worker has sent its first heartbeat to the pool: it polls for runs now."""
    try:
        r = httpx.post(f"{api}/work_pools/{pool}/workers/filter", json={}, timeout=5)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and any(w["name"] == name and w.get("status") == "ONLINE" for w in r.json())


def services(root: Path) -> list[Service]:
    """The three processes, in start order; the worker last: it needs the Prefect server."""
    state = root / STACK
    (mlflow_port, prefect_port), (mlflow_uri, api) = ports(), urls()
    pool = work_pool(root)
    worker = f"{pool}-stack-{socket.gethostname()}"
    common = {**QUIET_ENV, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(state / "prefect")}
    return [
        Service("mlflow", [str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(mlflow_port),
                           "--workers", "1",  # one uvicorn process: enough for a team's try-out, light on 2 cores
                           "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
                           "--artifacts-destination", str(state / "mlartifacts")],
                common, lambda: answers(f"{mlflow_uri}/health"), mlflow_port, "MLFLOW_PORT"),
        Service("prefect", [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)],
                common, lambda: answers(f"{api}/health"), prefect_port, "PREFECT_PORT"),
        Service("worker", [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
                           "--name", worker],
                {**common, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_uri,
                 "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},  # stage commands run this venv's python
                lambda: worker_online(api, pool, worker)),
    ]


# --- pid files: "<pid> <start time> <port>"; the start time, so that a recycled pid is never taken for ours ----

def pid_file(root: Path, name: str) -> Path:
    return root / STACK / f"{name}.pid"


def running(root: Path, name: str) -> tuple[psutil.Process, str] | None:
    """(the live process a pid file names, the port it was started on), if it is the one we started."""
    path = pid_file(root, name)
    try:
        pid, started, on_port = path.read_text().split()
        proc = psutil.Process(int(pid))
        if abs(proc.create_time() - float(started)) < 1 and proc.status() != psutil.STATUS_ZOMBIE:
            return proc, on_port
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def start(root: Path, service: Service) -> psutil.Process:
    log = open(root / STACK / f"{service.name}.log", "ab")
    proc = subprocess.Popen(service.cmd, cwd=root, env={**os.environ, **service.env}, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    ps = psutil.Process(proc.pid)
    pid_file(root, service.name).write_text(f"{proc.pid} {ps.create_time()} {service.port or '-'}\n")
    return ps


def log_tail(root: Path, name: str, chars: int = 3000) -> str:
    path = root / STACK / f"{name}.log"
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def wait_ready(root: Path, service: Service, proc: psutil.Process) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not service.ready():
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            raise StackError(f"{service.name} exited; {STACK}/{service.name}.log ends:\n{log_tail(root, service.name)}")
        if time.monotonic() > deadline:
            raise StackError(f"{service.name} did not answer within {STARTUP_TIMEOUT:g} s (STACK_TIMEOUT); "
                             f"{STACK}/{service.name}.log ends:\n{log_tail(root, service.name)}")
        time.sleep(0.5)


def stop(root: Path, name: str) -> bool:
    """Stop the service's process, its descendants and its process group; False when it was not running."""
    found = running(root, name)
    pid_file(root, name).unlink(missing_ok=True)
    if found is None:
        return False
    proc = found[0]
    procs = [proc, *proc.children(recursive=True)]
    for p in psutil.process_iter():  # children whose parent died already are still in the group
        try:
            if p.pid != proc.pid and os.getpgid(p.pid) == proc.pid:
                procs.append(p)
        except (OSError, psutil.Error):
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        _, procs = psutil.wait_procs(procs, timeout=STOP_GRACE)
        procs = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not procs:
            break
    return True


def ensure(root: Path, service: Service, started: list[str]) -> psutil.Process:
    """The service's running process; started (and its name added to `started`) if there is none."""
    found = running(root, service.name)
    if found is not None:
        proc, on_port = found
        if service.port is not None and on_port != str(service.port):
            raise StackError(f"{service.name} already runs on port {on_port}; `make stack-down` first to move it "
                             f"to {service.port_env}={service.port}")
        return proc
    if service.port is not None and taken(service.port):
        raise StackError(f"port {service.port} on {HOST} is taken by another program; "
                         f"choose another with {service.port_env}=<port>")
    started.append(service.name)
    return start(root, service)


@app.command()
def up(root: Path = typer.Option(Path("."), help="project folder (holds schedules.yaml); state goes to .stack/")) -> None:
    """Start the MLflow server, the Prefect server and a worker (those not running yet); print what to export."""
    root = root.resolve()
    (root / STACK).mkdir(exist_ok=True)
    started: list[str] = []
    try:
        todo = services(root)
        for group in (todo[:2], todo[2:]):  # both servers start at once; the worker once Prefect answers
            procs = [(service, ensure(root, service, started)) for service in group]
            for service, proc in procs:
                wait_ready(root, service, proc)
    except (StackError, OSError) as err:  # OSError: a command that could not start
        for name in reversed(started):
            stop(root, name)
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)
    how = {s.name: "started" if s.name in started else "already running" for s in todo}
    mlflow_uri, api = urls()
    typer.echo(f"MLflow   {mlflow_uri}   UI and tracking API ({how['mlflow']}; store {STACK}/mlflow.db, "
               f"artifacts {STACK}/mlartifacts)")
    typer.echo(f"Prefect  {api.removesuffix('/api')}   UI; API {api} ({how['prefect']})")
    typer.echo(f"worker   pool {work_pool(root)!r} ({how['worker']}; runs the recipes `distillery deploy` registers)")
    typer.echo(f"logs and pid files in {root / STACK}; stop them with `make stack-down`\n")
    typer.echo(f"export MLFLOW_TRACKING_URI={mlflow_uri}")
    typer.echo(f"export PREFECT_API_URL={api}")


@app.command()
def down(root: Path = typer.Option(Path("."), help="project folder (holds .stack/)")) -> None:
    """Stop the worker, the Prefect server and the MLflow server; nothing to do is not an error."""
    root = root.resolve()
    for name in ("worker", "prefect", "mlflow"):
        typer.echo(f"{name}: {'stopped' if stop(root, name) else 'not running'}")


if __name__ == "__main__":
    app()
