"""Prefect tasks that run DVC stages: DVC decides what changed, Prefect runs and records it.

The flow never keeps a cache of its own: each task asks DVC to reproduce one stage
(`dvc repro --single-item`), and DVC skips it when its deps, params and outs are unchanged.
So `dvc repro` alone and the flow agree on what runs and write the same `dvc.lock`.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import networkx as nx
import yaml
from prefect import get_run_logger, task
from prefect.states import Completed

from distillery.core import tracking

EXECUTED, SKIPPED, RESTORED = "executed", "skipped", "restored"


def stage_order(root: Path, targets: list[str]) -> list[str]:
    """The targets and every stage they depend on, in DVC's execution order."""
    from dvc.repo import Repo
    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        by_name = {s.addressing: s for s in graph.nodes}
        unknown = [t for t in targets if t not in by_name]
        if unknown:
            raise ValueError(f"dvc.yaml has no stage {unknown}; stages: {sorted(by_name)}")
        needed = set()
        for t in targets:
            needed |= {by_name[t]} | nx.descendants(graph, by_name[t])
        position = {s: i for i, s in enumerate(repo.index.stages)}  # ties broken by dvc.yaml's order
        order = nx.lexicographical_topological_sort(graph.subgraph(needed).reverse(), key=position.__getitem__)
        return [s.addressing for s in order]


def lock_entry(root: Path, stage: str) -> dict:
    """The stage's record in dvc.lock: cmd, deps and outs with their md5, params."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return {}
    return (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage, {})


def lineage_tags(entry: dict) -> dict[str, str]:
    tags = {}
    for kind in ("deps", "outs"):
        for item in entry.get(kind, []):
            if "md5" in item:
                tags[f"dvc.{kind}.{item['path']}"] = item["md5"]
    return tags


def tag_stage_run(parent_run_id: str, stage: str, tags: dict[str, str]) -> str | None:
    """Add DVC md5 tags to the nested run the stage opened; returns its run id."""
    import mlflow
    runs = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                            f"tags.`distillery.stage` = '{stage}'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    if not runs:
        return None
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_tag(runs[0].info.run_id, key, value)
    return runs[0].info.run_id


def reproduce_stage(root: Path, stage: str, parent_run_id: str) -> tuple[str, str | None]:
    """`dvc repro --single-item <stage>` under the parent run; (EXECUTED | SKIPPED | RESTORED, the stage's run id).

    The stage's own process opens its nested MLflow run (it finds the parent in the environment);
    this tags that run with the md5s DVC recorded for its deps and outs.
    """
    from dvc.repo import Repo
    logging.getLogger("dvc").propagate = False  # DVC prints its own progress; Prefect's handler would repeat it
    logging.getLogger("dvc.repo.scm_context").setLevel(logging.WARNING)  # "git add dvc.lock" hints after each stage
    env_bin = str(Path(sys.executable).parent)
    os.environ["PATH"] = env_bin + os.pathsep + os.environ.get("PATH", "")  # stage cmds use this venv's python
    os.environ[tracking.PARENT_ENV] = parent_run_id
    with Repo(str(root)) as repo:
        ran = repo.reproduce(stage, single_item=True)
    if not ran:
        return SKIPPED, None
    run_id = tag_stage_run(parent_run_id, stage, lineage_tags(lock_entry(root, stage)))
    return (EXECUTED, run_id) if run_id else (RESTORED, None)  # no run: DVC's run-cache restored the outputs


@task(task_run_name="{stage}", retries=0)
def run_stage(root: Path, stage: str, parent_run_id: str):
    """Reproduce one DVC stage if DVC says it changed; otherwise report it as skipped."""
    logger = get_run_logger()
    outcome, run_id = reproduce_stage(root, stage, parent_run_id)
    if outcome == SKIPPED:
        logger.info("%s: unchanged (deps, params and outs match dvc.lock), not re-executed", stage)
        return Completed(name="Skipped", message=f"{stage}: unchanged, reused from the DVC cache", data=SKIPPED)
    if outcome == RESTORED:
        logger.info("%s: restored from DVC's run-cache, not re-executed", stage)
        return Completed(name="Restored", message=f"{stage}: outputs restored from DVC's run-cache", data=RESTORED)
    logger.info("%s: executed (MLflow run %s)", stage, run_id)
    return EXECUTED
