"""The ablation flow on a real DVC repo: orders run concurrently, DVC's lock and verdicts stay right."""
import os
import subprocess
import sys

import mlflow
import pytest
import yaml

from repos import tracked_in
from test_pipeline import dvc, make_project, set_params

pytestmark = pytest.mark.slow
ABLATION = {"prune_epochs": 1, "qat_epochs": 1, "kd_epochs": 1, "seeds": 2, "calibration_size": 64,
            "warmup": 2, "runs": 20, "orders": {"pqd": {}, "qpd": {}, "dqp": {}}}


@pytest.fixture(scope="module")
def project(tmp_path_factory, harness):
    root = make_project(tmp_path_factory.mktemp("abl") / "p")
    set_params(root, ablation=ABLATION)
    with tracked_in(root):
        yield root


def run(root):
    from flows.ablation import ablation_flow
    return ablation_flow()(root=str(root))


def executed(outcome):
    return [s for s, o in outcome.items() if o == "executed"]


def check_table_against_onnx_runtime(root) -> None:
    """Score every models/ablation/<order>/seed<k>.int8.onnx here, with ORT directly; compare with the table's means."""
    import numpy as np
    import onnxruntime as ort
    import pandas as pd
    test = np.load(root / "data/prepared/test.npz")
    table = pd.read_csv(root / "reports/ablation.csv").set_index("order")
    for order, row in table.iterrows():
        accs = []
        for path in sorted((root / "models/ablation" / order).glob("seed*.int8.onnx")):
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            logits = np.concatenate([session.run(None, {name: x[None]})[0] for x in test["x"]])
            accs.append(100 * float((logits.argmax(1) == test["y"]).mean()))
        assert len(accs) == row["seeds"], order
        assert abs(np.mean(accs) - row["acc_mean_pct"]) <= 0.1, (order, accs, row["acc_mean_pct"])


def test_first_run_runs_every_order_and_records_it(project):
    outcome = run(project)
    assert executed(outcome) == ["prepare", "train", "ablation@pqd", "ablation@qpd", "ablation@dqp", "ablation_report"]
    for order in ("pqd", "qpd", "dqp"):
        assert sorted(p.name for p in (project / "models/ablation" / order).iterdir()) == \
            ["seed0.int8.onnx", "seed1.int8.onnx"]
    table = (project / "reports/ablation.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in table[1:]] == ["pqd", "qpd", "dqp"]
    assert (project / "reports/ablation.png").stat().st_size > 0
    check_table_against_onnx_runtime(project)
    assert "up to date" in dvc(project, "status", "--with-deps", "ablation_report")

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    parent = mlflow.search_runs(experiment_names=["distillery"], filter_string="tags.`distillery.recipe` = 'ablation' "
                                "and tags.`distillery.kind` = 'pipeline'", output_format="list")[0]
    assert parent.data.tags["stages.executed"] == ",".join(executed(outcome))
    assert sorted(a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "reports")) == \
        ["reports/ablation.csv", "reports/ablation.md", "reports/ablation.png"]
    children = mlflow.search_runs(experiment_names=["distillery"],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", output_format="list")
    results = [r for r in children if r.data.tags.get("distillery.kind") == "ablation-result"]
    assert sorted(r.data.tags["ablation.order"] + r.data.tags["ablation.seed"] for r in results) == \
        ["dqp0", "dqp1", "pqd0", "pqd1", "qpd0", "qpd1"]
    assert all(0 <= r.data.metrics["test_acc"] <= 1 and r.data.metrics["p50_ms_1t"] > 0 for r in results)
    stage_runs = {r.data.tags.get("distillery.stage"): r for r in children}
    assert stage_runs["ablation@qpd"].data.tags["dvc.outs.models/ablation/qpd"] == \
        next(o["md5"] for o in yaml.safe_load((project / "dvc.lock").read_text())["stages"]["ablation@qpd"]["outs"]
             if o["path"] == "models/ablation/qpd")


def test_second_run_runs_nothing_and_lock_matches_dvc_repro(project):
    lock = (project / "dvc.lock").read_text()
    assert executed(run(project)) == []
    assert (project / "dvc.lock").read_text() == lock
    out = dvc(project, "repro", "ablation_report")
    assert "Running stage" not in out
    assert (project / "dvc.lock").read_text() == lock


def test_committed_lock_entry_equals_what_dvc_repro_writes(project):
    committed = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["ablation@pqd"]
    subprocess.run([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "ablation@pqd"], cwd=project,
                   check=True, capture_output=True, env={**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep
                                                         + os.environ["PATH"]})
    repro = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["ablation@pqd"]
    strip = lambda e: {**e, "outs": [{k: v for k, v in o.items() if k not in ("md5", "size", "nfiles")}
                                     for o in e["outs"]]}  # noqa: E731  (ONNX bytes differ run to run)
    assert strip(repro) == strip(committed)


def test_changing_one_orders_param_reruns_that_order_only(project):
    set_params(project, ablation={"orders": {"pqd": {}, "qpd": {"kd_epochs": 2}, "dqp": {}}})
    assert executed(run(project)) == ["ablation@qpd", "ablation_report"]
