"""Real servers for tests: started on 127.0.0.1 in a process group of their own, waited for, always stopped.

`running(...)` is the one way a test starts a server (MLflow, Prefect, moto's S3) or a long-lived client
(a Prefect worker): it yields once the server answers its health URL, and on the way out, passed or failed,
stops the whole process tree, including children that left the group (Prefect starts each flow run in a
session of its own). A server that dies or never answers fails the test with the tail of its log.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

import httpx
import psutil

BIN = Path(sys.executable).parent  # the venv's console scripts: mlflow, prefect, moto_server, dvc
HOST = "127.0.0.1"
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1",
         "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
T = TypeVar("T")


def free_port() -> int:
    """A port nothing listens on now (the OS picks it); servers bind it a moment later."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tree(pid: int) -> list[psutil.Process]:
    """`pid`, its descendants and the rest of its process group: every process a server may have started."""
    try:
        root = psutil.Process(pid)
        found = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        found = {}
    for p in psutil.process_iter():
        try:
            if p.pid not in found and os.getpgid(p.pid) == pid:
                found[p.pid] = p
        except (ProcessLookupError, psutil.Error):
            pass
    return [p for p in found.values() if alive(p)]


def alive(p: psutil.Process) -> bool:
    """Running, not a zombie waiting for a parent (here, often init) to reap it."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_tree(procs: Sequence[psutil.Process], grace: float = 15) -> None:
    """SIGTERM every process, then SIGKILL the ones still there after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        _, procs = psutil.wait_procs(procs, timeout=grace)
        procs = [p for p in procs if alive(p)]
        if not procs:
            return


@dataclass
class Server:
    """A started process: its log, its base URL (None for a worker) and how to read why it failed."""
    name: str
    proc: subprocess.Popen
    log: Path
    url: str | None = None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def check_alive(self) -> None:
        assert self.proc.poll() is None, f"{self.name} exited with {self.proc.returncode}; log tail:\n{self.log_tail()}"

    def stop(self) -> None:
        kill_tree(tree(self.proc.pid))
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def wait_for(check: Callable[[], T | None], seconds: float, what: str, *watched: Server, every: float = 0.5) -> T:
    """Poll `check()` until it returns something truthy; fail at once when a watched process died, or at the
    deadline, with each watched process's log tail."""
    deadline = time.monotonic() + seconds
    while True:
        for server in watched:
            server.check_alive()
        try:
            found = check()
        except (httpx.HTTPError, OSError):
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {s.name} ({s.log}):\n{s.log_tail()}" for s in watched)
            raise AssertionError(f"{what}: not within {seconds:g} s\n{logs}")
        time.sleep(every)


def answers(url: str) -> bool:
    return httpx.get(url, timeout=5).status_code == 200


@contextlib.contextmanager
def running(name: str, cmd: Sequence[str], log: Path, env: Mapping[str, str] | None = None,
            health: str | None = None, url: str | None = None, timeout: float = 180,
            cwd: Path | None = None) -> Iterator[Server]:
    """Start `cmd` in a new session, yield once `health` answers 200 (at once without one), stop it after."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env={**os.environ, **QUIET, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    server = Server(name, proc, log, url)
    try:
        if health:
            wait_for(lambda: answers(health), timeout, f"{name} answering {health}", server)
        yield server
    finally:
        server.stop()


def mlflow_server(where: Path, port: int | None = None) -> contextlib.AbstractContextManager[Server]:
    """`mlflow server` on 127.0.0.1 with a SQLite store and proxied artifacts, both under `where`."""
    port = port or free_port()
    cmd = [str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{where / 'mlflow.db'}", "--artifacts-destination", str(where / "artifacts")]
    return running("mlflow server", cmd, where / "mlflow.log", health=f"http://{HOST}:{port}/health",
                   url=f"http://{HOST}:{port}")


def prefect_env(home: Path, api_url: str) -> dict[str, str]:
    """The environment a Prefect server, worker or client of that server gets: its own home, quiet logs."""
    return {"PREFECT_HOME": str(home), "PREFECT_API_URL": api_url, "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def prefect_server(home: Path, port: int | None = None, **settings: str) -> contextlib.AbstractContextManager[Server]:
    """`prefect server start` on 127.0.0.1 in its own PREFECT_HOME; `settings`: more PREFECT_* variables."""
    port = port or free_port()
    url = f"http://{HOST}:{port}/api"
    cmd = [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port)]
    return running("prefect server", cmd, home / "server.log", env={**prefect_env(home, url), **settings},
                   health=f"{url}/health", url=url)


def moto_server(where: Path, port: int | None = None) -> contextlib.AbstractContextManager[Server]:
    """moto's S3-compatible server on 127.0.0.1 (state in memory: gone when it stops)."""
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    return running("moto server", [str(BIN / "moto_server"), "-H", HOST, "-p", str(port)], where / "moto.log",
                   health=f"{url}/moto-api/", url=url)
