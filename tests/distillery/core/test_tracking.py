import mlflow

from distillery.core import tracking


def test_stage_run_nests_under_the_flows_parent_and_logs_params(mlflow_store, monkeypatch):
    tracking.init_mlflow()
    with mlflow.start_run(run_name="pqd") as parent:
        pass
    monkeypatch.setenv(tracking.PARENT_ENV, parent.info.run_id)
    with tracking.stage_run("train", {"epochs": 3, "nested": {"a": 1}}) as run:
        tracking.log_metrics({"val_acc": 0.5, "latency": {"p50_ms": 1.5}, "name": "skip-me"})
    got = mlflow.get_run(run.info.run_id)
    assert got.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert got.data.tags["distillery.stage"] == "train"
    assert got.data.params == {"train.epochs": "3", "train.nested.a": "1"}
    assert got.data.metrics == {"val_acc": 0.5, "latency.p50_ms": 1.5}
    assert mlflow_store.startswith("sqlite:///") and tracking.tracking_uri() == mlflow_store


def test_default_store_is_an_absolute_sqlite_file_in_the_project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
