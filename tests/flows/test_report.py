"""The cross-run report against a real SQLite MLflow store holding four pipeline runs of two recipes."""
import os

import mlflow
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.report import ReportError, write_report
from distillery.core import tracking

# (accuracy, p50 ms at 1 thread) per model; the Pareto front is marked with a comment
RUN_A = {"teacher": (0.95, 10.0), "pruned": (0.94, 6.0), "distilled": (0.945, 4.0),  # distilled: front
         "quantized": (0.94, 11.0)}  # INT8 yet slower than the teacher: flagged
RUN_B = {"teacher": (0.95, 9.5), "pruned": (0.94, 5.5), "distilled": (0.945, 4.2),  # benchmark only; teacher: front
         "quantized": (0.94, 9.0)}  # faster than the teacher this time: no flag
RUN_D = {"teacher": (0.90, 20.0), "student": (0.93, 3.0)}  # recipe ppcl; student: front
FRONT = {("pqd", "distilled", 4.0), ("pqd", "teacher", 9.5), ("ppcl", "student", 3.0)}
INT8_SHARE = {"quantized": 1.0, "distilled": 0.97, "student": 0.95}  # the rest is FP32


def latency(figures: dict) -> dict:
    """The benchmark stage's `result["models"]` for these figures."""
    base = figures["teacher"][1]
    return {m: {"threads_1": {"p50_ms": p, "speedup_p50": base / p}, "threads_all": {"p50_ms": p / 2, "speedup_p50": base / p},
                "size_bytes": int(1000 * p), "int8_mac_share": INT8_SHARE.get(m, 0.0)} for m, (_, p) in figures.items()}


def pipeline_run(recipe: str, stages: dict[str, tuple[dict, dict]]) -> dict[str, str]:
    """A parent run and, per executed stage, its nested run through distillery.core.tracking as the stages log them."""
    runs = {}
    with mlflow.start_run(run_name=recipe, tags={"distillery.kind": "pipeline", "distillery.recipe": recipe}) as parent:
        runs["parent"] = parent.info.run_id
    os.environ[tracking.PARENT_ENV] = runs["parent"]
    try:
        for stage, (params, metrics) in stages.items():
            with tracking.stage_run(stage, params) as run:
                tracking.log_metrics(metrics)
                runs[stage] = run.info.run_id
    finally:
        os.environ.pop(tracking.PARENT_ENV)
    return runs


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.chdir(root)
        tracking.init_mlflow(root)
        accuracy = {f"{m}.accuracy": a for m, (a, _) in RUN_A.items()}
        runs = {
            "A": pipeline_run("pqd", {"prepare": ({"seed": 0}, {}), "evaluate": ({"batch_size": 256}, accuracy),
                                      "benchmark": ({"runs": 100}, latency(RUN_A))}),
            "B": pipeline_run("pqd", {"benchmark": ({"runs": 200}, latency(RUN_B))}),
            "C": pipeline_run("pqd", {}),  # nothing changed: no stage ran, no rows
            "D": pipeline_run("ppcl", {"prepare": ({"seed": 0}, {}),
                                       "evaluate": ({"batch_size": 256}, {f"{m}.accuracy": a for m, (a, _) in RUN_D.items()}),
                                       "benchmark": ({"runs": 200}, latency(RUN_D))}),
        }
        paths = write_report(root)
        yield root, runs, paths


def test_every_figure_in_the_report_is_the_mlflow_metric_of_the_run_it_names(history):
    _, runs, paths = history
    table = pd.read_csv(paths["csv"])
    assert len(table) == len(RUN_A) + len(RUN_B) + len(RUN_D)
    metric_of = {"accuracy": "{m}.accuracy", "size_bytes": "{m}.size_bytes", "p50_ms_1t": "{m}.threads_1.p50_ms",
                 "p50_ms_all": "{m}.threads_all.p50_ms", "speedup_1t": "{m}.threads_1.speedup_p50",
                 "int8_mac_share": "{m}.int8_mac_share"}
    cache = {}
    for _, row in table.iterrows():
        for col, metric in metric_of.items():
            run_id = row["evaluate_run"] if col == "accuracy" else row["benchmark_run"]
            metrics = cache.setdefault(run_id, mlflow.get_run(run_id).data.metrics)
            assert row[col] == metrics[metric.format(m=row["model"])], (row["model"], col)
    b_rows = table[table["pipeline_run"] == runs["B"]["parent"]]
    assert set(b_rows["benchmark_run"]) == {runs["B"]["benchmark"]}
    assert set(b_rows["evaluate_run"]) == {runs["A"]["evaluate"]}  # evaluate was reused in B: A's figures
    assert dict(zip(b_rows["model"], b_rows["p50_ms_1t"])) == {m: p for m, (_, p) in RUN_B.items()}
    assert runs["C"]["parent"] not in set(table["pipeline_run"])
    assert set(table[table["recipe"] == "ppcl"]["model"]) == {"teacher", "student"}


def test_only_params_that_differ_are_columns_and_the_pareto_front_is_marked(history):
    _, _, paths = history
    table = pd.read_csv(paths["csv"])
    params = [c for c in table if c.startswith("param.")]
    assert params == ["param.benchmark.runs"]  # prepare.seed and evaluate.batch_size are the same everywhere
    assert dict(zip(zip(table["recipe"], table["model"], table["p50_ms_1t"]), table["param.benchmark.runs"]))[
        ("pqd", "teacher", 10.0)] == 100
    assert set(zip(*(table[table["pareto"]][c] for c in ("recipe", "model", "p50_ms_1t")))) == FRONT
    md = paths["md"].read_text()
    assert "benchmark.runs" in md and "94.500" in md and "student" in md and md.count("| *") == len(FRONT)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(paths["md"].parent.glob(".*.tmp"))  # atomic writes leave no temp files


def test_the_int8_share_is_a_column_and_an_int8_model_no_faster_than_the_teacher_is_flagged(history):
    _, runs, paths = history
    table = pd.read_csv(paths["csv"], keep_default_na=False)
    flagged = table[table["note"] != ""]
    assert list(zip(flagged["pipeline_run"], flagged["model"])) == [(runs["A"]["parent"], "quantized")]
    assert flagged["note"].iloc[0] == "⚠ not faster than FP32 (x0.91 at 1T, x0.91 at all cores)"
    # the teacher is never slower than itself (x1.00), and it is FP32: no note
    assert set(table[table["model"] == "teacher"]["note"]) == {""}
    md = paths["md"].read_text()
    assert "INT8 MACs %" in md and md.count("⚠ not faster than FP32") == 1
    row = next(line for line in md.splitlines() if line.startswith("| quantized") and runs["A"]["parent"][:8] in line)
    cells = [c.strip() for c in row.split("|")]
    assert "100.000" in cells and "⚠ not faster than FP32 (x0.91 at 1T, x0.91 at all cores)" in cells


def test_report_cli_writes_the_three_files(history):
    root, _, paths = history
    before = paths["csv"].read_text()
    result = CliRunner().invoke(app, ["report", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert paths["csv"].read_text() == before


def test_an_empty_store_is_a_clear_error(mlflow_store, tmp_path):
    tracking.init_mlflow(tmp_path)
    with pytest.raises(ReportError, match="run a pipeline first"):
        write_report(tmp_path)
    result = CliRunner().invoke(app, ["report", "--root", str(tmp_path)])
    assert result.exit_code == 2 and "run a pipeline first" in result.output
