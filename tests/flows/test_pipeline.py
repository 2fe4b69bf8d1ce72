"""The one test module that runs Prefect flows: a real DVC repo, real MLflow, real ORT, in tmp_path."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from repos import init_git_dvc, tracked_in

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "prepare": {"image_size": 8},
    "train": {"model": "toy", "model_kwargs": {"width": 0.5}, "epochs": 2, "patience": 2},
    "prune": {"finetune_epochs": 1},
    "quantize": {"epochs": 1, "freeze_observers_epoch": 1},
    "distill": {"epochs": 1},
    "benchmark": {"warmup": 2, "runs": 20, "threads": [1]},
}

pytestmark = pytest.mark.slow


def set_params(project: Path, **sections) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for name, patch in sections.items():
        params[name].update(patch)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(dest: Path) -> Path:
    """A copy of this project's pipeline (code, dvc.yaml, params, raw data) as its own git + DVC repo."""
    dest.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, dest / name)
    for name in ("distillery", "tasks", "data/raw"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    set_params(dest, **TINY)
    return init_git_dvc(dest)


@pytest.fixture(scope="module")
def project(tmp_path_factory, harness):
    root = make_project(tmp_path_factory.mktemp("proj") / "p")
    with tracked_in(root):
        yield root


def run(root: Path) -> dict[str, str]:
    from flows.pipeline import pipeline
    return pipeline(recipe="pqd", root=str(root))


def executed(outcome: dict[str, str]) -> list[str]:
    return [s for s, o in outcome.items() if o == "executed"]


def dvc(root: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def test_first_run_executes_every_stage_and_records_it(project):
    outcome = run(project)
    assert executed(outcome) == ["prepare", "train", "prune", "quantize", "distill", "export", "evaluate", "benchmark"]
    for path in ("models/teacher.fp32.onnx", "models/pqd/student.int8.onnx", "data/prepared/test.npz", "reports/pqd.md"):
        assert (project / path).exists(), path
    assert "up to date" in dvc(project, "status", "--with-deps", "benchmark")  # the pqd pipeline; ppcl and ablation did not run

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    parent = mlflow.search_runs(experiment_names=["distillery"], filter_string="tags.`distillery.kind` = 'pipeline'",
                                output_format="list")[0]
    children = mlflow.search_runs(experiment_names=["distillery"],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", output_format="list")
    by_stage = {r.data.tags["distillery.stage"]: r for r in children}
    assert set(by_stage) == set(outcome)
    bench = by_stage["benchmark"]
    assert bench.data.metrics["teacher.threads_1.p50_ms"] > 0
    export_outs = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["export"]["outs"]
    assert bench.data.tags["dvc.deps.models/teacher.fp32.onnx"] == next(
        o["md5"] for o in export_outs if o["path"] == "models/teacher.fp32.onnx")
    assert bench.data.tags["git.commit"] != "unknown"
    assert parent.data.tags["stages.executed"] == ",".join(outcome)


def test_second_run_with_nothing_changed_executes_nothing(project):
    lock = (project / "dvc.lock").read_text()
    outcome = run(project)
    assert executed(outcome) == []
    assert (project / "dvc.lock").read_text() == lock


def test_changing_one_benchmark_key_reruns_benchmark_only(project):
    set_params(project, benchmark={"runs": 30})
    assert executed(run(project)) == ["benchmark"]


def test_plain_dvc_repro_agrees_with_the_flow(project):
    lock = (project / "dvc.lock").read_text()
    out = dvc(project, "repro", "benchmark")
    assert "didn't change, skipping" in out or "up to date" in out
    assert "Running stage" not in out
    assert (project / "dvc.lock").read_text() == lock


def repro_ran(out: str) -> list[str]:
    """The stages `dvc repro` executed, from its 'Running stage' lines, in order."""
    return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]


def test_second_run_records_which_stages_were_reused(project):
    outcome = run(project)
    assert executed(outcome) == []
    parent = mlflow.search_runs(experiment_names=["distillery"], filter_string="tags.`distillery.kind` = 'pipeline'",
                                order_by=["attributes.start_time DESC"], max_results=1, output_format="list")[0]
    assert parent.data.tags["stages.executed"] == "none"
    assert parent.data.tags["stages.reused"] == ",".join(outcome)


PQD_ORDER = ["prepare", "train", "prune", "quantize", "distill", "export", "evaluate", "benchmark"]


def test_a_param_change_reruns_that_stage_and_its_descendants_with_plain_dvc_too(project):
    set_params(project, prune={"sparsity": 0.6})
    assert repro_ran(dvc(project, "repro", "benchmark")) == PQD_ORDER[2:]


def test_a_code_change_reruns_that_stage_and_only_descendants_whose_inputs_changed(project):
    # DVC is content-addressed: a descendant re-runs only if an upstream output's md5 changed.
    # A comment changes no output, so the edited stage runs and its descendants are skipped.
    with open(project / "tasks/evaluate.py", "a") as f:
        f.write("\n# a code change DVC must notice\n")
    assert executed(run(project)) == ["evaluate"]
    with open(project / "tasks/distill.py", "a") as f:
        f.write("\n# a code change DVC must notice\n")
    ran = repro_ran(dvc(project, "repro", "benchmark"))
    assert ran[0] == "distill" and set(ran) <= set(PQD_ORDER[4:])


def test_changed_input_data_reruns_everything_from_prepare(project):
    raw = project / "data/raw/digits.npz"
    import numpy as np
    with np.load(raw) as f:
        x, y = f["x"][:-7], f["y"][:-7]  # a user's data set lost a few images
    np.savez_compressed(raw, x=x, y=y)
    assert executed(run(project)) == PQD_ORDER
