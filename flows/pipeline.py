"""The pipeline flow: validate params, then run a recipe's DVC stages in order, one task each.

One MLflow parent run per pipeline run; each executed stage opens a nested run under it
(its process finds the parent in DISTILLERY_PARENT_RUN_ID). Which stages were executed and
which were reused is recorded on the parent run and in the flow's return value.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from distillery.core import tracking
from distillery.core.errors import DistilleryError
from distillery.core.params import load_params
from flows.dvc_stages import EXECUTED, run_stage, stage_order
from flows.registry import REGISTERED, register_models
from flows.user_deps import sync as sync_user_deps
from tasks.paths import ABLATION_REPORT, MENU_REPORT, PQD_REPORT

# Each recipe names the stage(s) it ends with; DVC's graph supplies everything upstream.
PIPELINES: dict[str, list[str]] = {
    "pqd": ["benchmark"],
    "ppcl": ["menu"],
}
# recipe -> its reports: each one an MLflow artifact of the parent run, the markdown ones also on the Prefect run
REPORTS: dict[str, list[str]] = {
    "pqd": [str(PQD_REPORT.with_suffix(".md"))],
    "ppcl": [str(MENU_REPORT.with_suffix(".md"))],
    "ablation": [str(ABLATION_REPORT.with_suffix(s)) for s in (".md", ".csv", ".png")],
}


class RunLocked(DistilleryError):
    """Another `distillery run` holds this project."""


@contextlib.contextmanager
def project_lock(root: Path) -> Iterator[None]:
    """One pipeline run per project at a time; a second one stops at once and says why."""
    path = root / ".distillery" / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RunLocked(f"another distillery run is in progress in {root} ({f.read().strip() or 'pid unknown'}); "
                            "wait for it to finish, then run again") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def mark_orphans_killed(parent_run_id: str) -> None:
    """A stage killed mid-run cannot close its MLflow run; close it as KILLED from here."""
    import mlflow
    client = mlflow.MlflowClient()
    for run in mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                                "attributes.status = 'RUNNING'", output_format="list"):
        client.set_terminated(run.info.run_id, status="KILLED")


def split_outcome(outcome: dict[str, str]) -> tuple[list[str], list[str]]:
    """(executed, reused) stage names."""
    executed = [s for s, o in outcome.items() if o == EXECUTED]
    return executed, [s for s in outcome if s not in executed]


@contextlib.contextmanager
def recipe_run(recipe: str, root: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The recipe's MLflow parent run: yields its id and the stage -> outcome dict for the flow to fill.

    On exit, even a failed one, stage runs left open by a killed process are closed as KILLED and the
    parent is tagged with the stages executed and reused.
    """
    import mlflow
    tracking.init_mlflow(root)
    outcome: dict[str, str] = {}
    with mlflow.start_run(run_name=recipe, tags={"distillery.kind": "pipeline", "distillery.recipe": recipe,
                                                 "git.commit": tracking.git_commit(root),
                                                 "prefect.flow_run_id": str(flow_run.get_id()),
                                                 **tracking.owner_tags()}) as parent:
        try:
            yield parent.info.run_id, outcome
        finally:
            mark_orphans_killed(parent.info.run_id)
            executed, reused = split_outcome(outcome)
            mlflow.set_tags({"stages.executed": ",".join(executed) or "none", "stages.reused": ",".join(reused) or "none"})
            mlflow.log_metrics({"stages_executed": len(executed), "stages_reused": len(reused)})


def attach_reports(recipe: str, root: Path) -> None:
    """The recipe's reports that exist: MLflow artifacts of the active run; the markdown ones also Prefect artifacts."""
    import mlflow
    for report in REPORTS.get(recipe, []):
        path = root / report
        if not path.exists():
            continue
        mlflow.log_artifact(str(path), artifact_path="reports")
        if path.suffix == ".md":
            create_markdown_artifact(path.read_text(), key=f"{recipe}-{path.stem}".replace("_", "-"),
                                     description=f"{recipe}: {report}")


def log_outcome(outcome: dict[str, str]) -> None:
    executed, reused = split_outcome(outcome)
    logger = get_run_logger()
    logger.info("executed: %s; reused: %s", ", ".join(executed) or "none", ", ".join(reused) or "none")
    if not executed:
        logger.info("nothing changed since the last run: no stage was re-executed")


@flow(name="distillery-pipeline", flow_run_name="{recipe}", log_prints=True)
def pipeline(recipe: str = "pqd", root: str = ".") -> dict[str, str]:
    """Run one recipe's DVC stages in DVC's order; unchanged stages are skipped, not re-run."""
    root_path = Path(root).resolve()
    os.chdir(root_path)
    for line in sync_user_deps(root_path, load_params(root_path / "params.yaml")):
        print(line)  # a scheduled run whose params.yaml names other user files
    stages = stage_order(root_path, PIPELINES[recipe])
    with recipe_run(recipe, root_path) as (parent_run_id, outcome):
        for stage in stages:
            outcome[stage] = run_stage(root_path, stage, parent_run_id)
        if recipe in REGISTERED:
            register_models(recipe, root_path, parent_run_id)
        attach_reports(recipe, root_path)
    log_outcome(outcome)
    return outcome
