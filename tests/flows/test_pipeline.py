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
    "benchmark": {"warmup": 2, "runs": 20, "threads": [1], "batch_runs": 3, "profile_runs": 5},
}
PQD_ORDER = ["prepare", "train", "prune", "quantize", "distill", "export", "counterpart", "baselines", "evaluate",
             "benchmark"]

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
    assert executed(outcome) == PQD_ORDER
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


def test_the_report_sets_every_peer_and_both_pruning_methods_beside_the_student(project):
    """The baselines stage's peers and the counterpart student are timed with the teacher and reported."""
    import json
    peers = json.loads((project / "metrics/baselines.json").read_text())
    assert set(peers["peers"]) == {"ort_u8s8", "ort_s8s8", "nncf", "olive"}
    assert peers["calibration_sha256"] == json.loads((project / "metrics/quantize.json").read_text())["calibration_sha256"]
    ok = {n for n, r in peers["peers"].items() if r["status"] == "ok"}
    assert {"ort_u8s8", "nncf"} <= ok, peers  # the tools a user would pick quantize this toy CNN
    bench = json.loads((project / "metrics/benchmark.json").read_text())
    timed = set(bench["models"])
    assert {"teacher", "distilled", "distilled_structured"} | ok == timed - {"pruned", "quantized"}
    for name in timed:
        r = bench["models"][name]
        assert r["threads_1"]["p90_ms"] >= r["threads_1"]["p50_ms"] > 0
        assert r["batch32_threads_1"]["images_per_s"] > 0  # every export takes any batch
    assert bench["profile"]["distilled"]["int8_pct"] > 50 and bench["profile"]["teacher"]["int8_pct"] == 0
    import pandas as pd
    table = pd.read_csv(project / "reports/pqd.csv").set_index("model")
    assert set(table.index) == timed | set(peers["peers"])
    assert (table.loc[sorted(ok), "kind"] == "peer").all()
    assert table.loc["distilled_structured", "mmacs"] < table.loc["distilled", "mmacs"]
    report = (project / "reports/pqd.md").read_text()
    for needle in ("## Against the post-training peers", "the fastest peer", "## Where the time goes", "VNNI peak"):
        assert needle in report, needle


def test_switching_a_peer_off_reruns_baselines_and_leaves_a_row_saying_so(project):
    set_params(project, baselines={"peers": {"ort_u8s8": True, "ort_s8s8": False, "nncf": True, "olive": True}})
    ran = executed(run(project))
    assert ran == ["baselines", "evaluate", "benchmark"]
    assert not (project / "models/baselines/ort_s8s8.int8.onnx").exists()
    import pandas as pd
    table = pd.read_csv(project / "reports/pqd.csv").set_index("model")
    assert table.loc["ort_s8s8", "note"] == "off (baselines.peers)" and pd.isna(table.loc["ort_s8s8", "p50_ms_1t"])


def test_a_param_change_reruns_that_stage_and_its_descendants_with_plain_dvc_too(project):
    set_params(project, prune={"sparsity": 0.6})
    ran = repro_ran(dvc(project, "repro", "benchmark"))
    assert ran == [s for s in PQD_ORDER if s in ran]  # in the DAG's order
    # the teacher's ONNX is re-exported byte for byte, so the peers need not run again
    assert set(PQD_ORDER[2:]) - {"baselines"} <= set(ran) <= set(PQD_ORDER[2:])


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
