"""The MLflow record: one parent run per pipeline run, one nested run per executed stage.

The store is a SQLite file in the project (`mlflow.db`, artifacts in `mlartifacts/`) unless
`MLFLOW_TRACKING_URI` names another. A stage started by the flow finds its parent run in
`DISTILLERY_PARENT_RUN_ID`; a stage started by plain `dvc repro` records a run of its own.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from pathlib import Path
from typing import Iterator

PARENT_ENV = "DISTILLERY_PARENT_RUN_ID"
EXPERIMENT_ENV = "DISTILLERY_EXPERIMENT"
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1",
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def quiet_telemetry() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def tracking_uri(root: Path | None = None) -> str:
    root = (root or Path.cwd()).resolve()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV, "distillery")


def init_mlflow(root: Path | None = None) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    quiet_telemetry()
    import mlflow
    root = (root or Path.cwd()).resolve()
    mlflow.set_tracking_uri(tracking_uri(root))
    name = experiment_name()
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        location = (root / "mlartifacts").as_uri() if tracking_uri(root).startswith("sqlite") else None
        exp_id = mlflow.create_experiment(name, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    close_dead_runs(exp_id)
    return exp_id


def owner_tags() -> dict[str, str]:
    """Which process owns a run, so that a later one can tell a crashed run from a live one."""
    return {"distillery.host": socket.gethostname(), "distillery.pid": str(os.getpid())}


def close_dead_runs(exp_id: str) -> list[str]:
    """Mark KILLED every RUNNING run whose process on this host is gone (SIGKILL, power loss); returns their ids."""
    import mlflow
    closed = []
    for run in mlflow.search_runs([exp_id], filter_string=f"attributes.status = 'RUNNING' and "
                                  f"tags.`distillery.host` = '{socket.gethostname()}'", output_format="list"):
        pid = int(run.data.tags.get("distillery.pid", "0"))
        try:
            os.kill(pid, 0)
            continue  # still alive (or not ours to signal): leave it running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        mlflow.MlflowClient().set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


def git_commit(root: Path | None = None) -> str:
    """HEAD's commit, with '-dirty' when tracked files differ from it; 'unknown' outside git."""
    cwd = str(root or Path.cwd())
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextlib.contextmanager
def stage_run(stage: str, params: dict, recipe: str | None = None) -> Iterator[object]:
    """A run for one stage: nested under the flow's parent run when there is one."""
    init_mlflow()
    import mlflow
    parent = os.environ.get(PARENT_ENV) or None
    tags = {"distillery.stage": stage, "distillery.kind": "stage", "git.commit": git_commit(), **owner_tags()}
    if recipe:
        tags["distillery.recipe"] = recipe
    with mlflow.start_run(run_name=stage, parent_run_id=parent, tags=tags) as run:
        if params:
            mlflow.log_params({f"{stage}.{k}": v for k, v in flatten(params).items()})
        yield run


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow
    clean = {k.replace("@", "_"): float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_onnx_model(path: Path | str, name: str) -> None:
    """Log an exported ONNX file as an MLflow model of the active run."""
    import mlflow
    import onnx
    mlflow.onnx.log_model(onnx.load(str(path)), name=name)


def set_tags(tags: dict[str, str]) -> None:
    """Tag the active run (a stage's nested run)."""
    import mlflow
    mlflow.set_tags(tags)


def log_params(params: dict) -> None:
    """Log params on the active run, nested keys flattened with dots."""
    import mlflow
    mlflow.log_params(flatten(params))


def log_artifacts(paths: list[Path | str], artifact_path: str) -> None:
    """Attach files to the active run under `artifact_path`."""
    import mlflow
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)
