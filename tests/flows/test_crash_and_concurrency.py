"""Crashes and concurrent runs, in real tmp projects (git + DVC + SQLite MLflow), with tiny params.

A pipeline SIGKILLed in the middle of `train` resumes from its last epoch when re-run, re-executes no
finished stage, never shows a half-written output, and leaves no MLflow run RUNNING; a second
`distillery run` in a busy project stops at once naming the one that runs; two runs from scratch
with the same seed train the same teacher.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from tests.flows.test_pipeline import make_project, set_params

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = ["models/teacher.pt", "data/prepared/train.npz", "data/prepared/meta.json", "metrics/train.json"]


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")  # stage cmds: this venv's python
    e["PYTHONPATH"] = str(ROOT)  # the stages' code, for project folders that hold only data and params
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "DISTILLERY_PARENT_RUN_ID", "DISTILLERY_DEBUG"):
        e.pop(key, None)  # each project uses its own mlflow.db and a temporary Prefect server
    return e


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


class OutputWatcher:
    """Polls the output paths during a run: every time one exists it must load completely."""

    def __init__(self, root: Path):
        self.root, self.bad, self.seen = root, [], set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _check(self, rel: str) -> None:
        from distillery.core.artifacts import load_checkpoint
        path = self.root / rel
        if not path.exists():
            return
        try:
            if path.suffix == ".pt":
                load_checkpoint(path)
            elif path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as f:
                    f["x"], f["y"]
            else:
                json.loads(path.read_text())
            self.seen.add(rel)
        except FileNotFoundError:
            pass  # replaced between exists() and open(): the rename is atomic, the old inode is gone
        except Exception as err:  # noqa: BLE001  any half-written file is a failure
            self.bad.append(f"{rel}: {type(err).__name__}: {err}")

    def _run(self) -> None:
        while not self._stop.is_set():
            for rel in OUTPUTS:
                self._check(rel)
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def runs(root: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.fixture
def project(tmp_path):
    root = make_project(tmp_path / "p")
    set_params(root, train={"epochs": 4, "patience": 100})
    return root


def test_sigkill_mid_train_then_rerun_resumes_and_nothing_half_written_is_ever_visible(project):
    resume_dir = project / ".distillery/resume"
    with OutputWatcher(project) as watch:
        first = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train"], cwd=project, env=env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: any(resume_dir.glob("train-*.pt")), 600, "train's first epoch state", first)
        kill_group(first)  # dvc and the stage process with it, as a power cut or OOM-killer would
        assert not (project / "models/teacher.pt").exists()
        assert not list((project / "models").glob(".teacher.pt.*")) if (project / "models").exists() else True
        second = subprocess.run([sys.executable, "-m", "dvc", "repro", "train"], cwd=project, env=env(),
                                capture_output=True, text=True, timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "Stage 'prepare' didn't change, skipping" in out  # the finished stage is not re-executed
    assert "resuming from" in out
    assert not watch.bad, watch.bad
    assert {"models/teacher.pt", "data/prepared/train.npz", "metrics/train.json"} <= watch.seen
    assert json.loads((project / "metrics/train.json").read_text())["epochs_run"] == 4  # history kept across the kill
    assert not any(resume_dir.glob("train-*.pt"))  # the finished stage cleans its resume state

    by_status = sorted((r.info.run_name, r.info.status) for r in runs(project))
    assert by_status == [("prepare", "FINISHED"), ("train", "FINISHED"), ("train", "KILLED")]
    assert "up to date" in subprocess.run([sys.executable, "-m", "dvc", "status", "train"], cwd=project, env=env(),
                                          capture_output=True, text=True, check=True).stdout


def test_a_second_run_in_the_same_project_stops_at_once_naming_the_first(project, tmp_path):
    cmd = [sys.executable, "-m", "flows.cli", "run", "pqd", "--root", str(project)]
    e = env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    first = subprocess.Popen(cmd, cwd=project, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    lock = project / ".distillery/run.lock"
    try:
        wait_for(lambda: lock.exists() and f"pid {first.pid}" in lock.read_text(), 300, "the first run's lock", first)
        start = time.monotonic()
        second = subprocess.run(cmd, cwd=project, env=e, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run must still be running"
    finally:
        kill_group(first)
    assert second.returncode == 2, second.stderr[-2000:]
    assert "another distillery run is in progress" in second.stderr and f"pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr and "Starting temporary server" not in second.stdout + second.stderr
    assert time.monotonic() - start < 120
    # the store, DVC's lock and cache stay usable after the refused run and the killed one
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=project, env=env(), capture_output=True,
                            text=True, timeout=300)
    assert status.returncode == 0, status.stderr
    if (project / "mlflow.db").exists():
        from distillery.core import tracking
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
        try:
            tracking.init_mlflow(project)  # a later run closes what the killed one left RUNNING
        finally:
            os.environ.pop("MLFLOW_TRACKING_URI")
        assert all(r.info.status != "RUNNING" for r in runs(project))


def test_two_runs_from_scratch_with_the_same_seed_train_the_same_teacher(tmp_path):
    projects = []
    for name in ("a", "b"):
        root = tmp_path / name
        (root / "data").mkdir(parents=True)
        shutil.copytree(ROOT / "data/raw", root / "data/raw")
        shutil.copy(ROOT / "params.yaml", root / "params.yaml")
        set_params(root, prepare={"image_size": 8}, train={"model": "toy", "model_kwargs": {"width": 0.5}, "epochs": 2, "patience": 2})
        projects.append(root)
    chain = f"{sys.executable} -m tasks.prepare && {sys.executable} -m tasks.train"
    procs = [subprocess.Popen(["bash", "-c", chain], cwd=root, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for root in projects]  # side by side: 2 cores
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-2000:]
    a, b = (json.loads((root / "metrics/train.json").read_text()) for root in projects)
    assert a == b  # val and test accuracy, best epoch: all the same
    from distillery.core.artifacts import load_checkpoint
    wa, wb = (load_checkpoint(root / "models/teacher.pt")["state_dict"] for root in projects)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the same weights, bit for bit
    md5 = [hashlib.md5((root / "models/teacher.pt").read_bytes()).hexdigest() for root in projects]
    assert md5[0] == md5[1]  # and the same file: checkpoints are byte-reproducible


EXPORT_LOOP = """
import sys, torch
from distillery.models import build_model
from distillery.onnx_export import export_fp32_onnx
model = build_model({"arch": "toy", "width": 0.5, "depth": 1, "in_channels": 1, "num_classes": 10})
for i in range(1000):
    export_fp32_onnx(model, (torch.zeros(1, 1, 8, 8),), sys.argv[1])
    print("exported", i, flush=True)
"""


def test_sigkill_during_onnx_export_leaves_the_old_file_or_the_new_one_never_half(tmp_path):
    from distillery.onnx_export import load_session
    path = tmp_path / "models/teacher.fp32.onnx"
    proc = subprocess.Popen([sys.executable, "-c", EXPORT_LOOP, str(path)], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().startswith("exported 0"), "the first export failed"
        checked, deadline = 0, time.monotonic() + 4  # the next exports are under way: watch the output path
        while time.monotonic() < deadline:
            try:
                load_session(path, threads=1)  # an ArtifactError here would be a half-written file
                checked += 1
            except FileNotFoundError:
                pass
    finally:
        kill_group(proc)  # in the middle of an export
    assert checked > 0
    load_session(path, threads=1)  # what is left at the output path is a whole model
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == [path.name]
