"""Stage `ablation_report`: the six orders side by side, measured in ONNX Runtime in one process.

Every (order, seed) INT8 model is scored on the test split and timed at one thread, batch 1,
interleaved with the FP32 teacher (exported here from `models/teacher.pt` with the `export`
stage's exporter and opset, so the ablation does not wait for the PQD chain). Writes
`reports/ablation.{md,csv,png}` and, in MLflow, one run per (order, seed) with its accuracy and
latency, nested under the pipeline's parent run.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from distillery.core import tracking
from distillery.core.artifacts import write_json, write_text
from distillery.core.errors import ArtifactError, run_stage
from distillery.core.params import load_section
from distillery.core.plotting import pyplot, save_figure
from distillery.data import input_shape, load_prepared
from distillery.latency import cpu_info, time_models
from distillery.models import load_model
from distillery.onnx_export import export_fp32_onnx, onnx_accuracy
from tasks.paths import ABLATION_REPORT, ABLATION_TEACHER_ONNX as TEACHER_ONNX, PREPARED, TEACHER, ablation_model, metrics

REPORT_MD, REPORT_CSV, REPORT_PNG = (ABLATION_REPORT.with_suffix(s) for s in (".md", ".csv", ".png"))


def measure(orders: dict[str, int], teacher_onnx: Path, x: np.ndarray, y: np.ndarray, warmup: int,
            runs: int) -> tuple[pd.DataFrame, dict]:
    """One row per (order, seed): ORT test accuracy, size, p50 at one thread; and the teacher's figures."""
    paths = {f"{o}/seed{s}": ablation_model(o, s) for o, n in orders.items() for s in range(n)}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise ArtifactError(f"ablation models missing: {missing[:3]}; run `distillery run ablation`")
    latency = time_models({"teacher": teacher_onnx, **paths}, x, threads=1, warmup=warmup, runs=runs)
    teacher = {"test_acc": onnx_accuracy(teacher_onnx, x, y), "p50_ms": latency["teacher"]["p50_ms"],
               "size_bytes": teacher_onnx.stat().st_size}
    rows = []
    for name, path in paths.items():
        order, seed = name.split("/seed")
        rows.append({"order": order, "seed": int(seed), "test_acc": onnx_accuracy(path, x, y),
                     "size_bytes": path.stat().st_size, **{k: latency[name][k] for k in ("p50_ms", "p90_ms", "mean_ms")},
                     "speedup_p50": teacher["p50_ms"] / latency[name]["p50_ms"]})
    return pd.DataFrame(rows), teacher


def summarise(runs: pd.DataFrame, teacher: dict) -> pd.DataFrame:
    """One row per order: accuracy mean and spread over seeds, size, p50 and speed-up vs the teacher."""
    g = runs.groupby("order", sort=False)
    table = pd.DataFrame({
        "seeds": g.size(),
        "acc_mean_pct": 100 * g["test_acc"].mean(),
        "acc_std_pct": 100 * g["test_acc"].std(ddof=1).fillna(0.0),
        "size_kb": g["size_bytes"].mean() / 1024,
        "p50_ms_1t": g["p50_ms"].mean(),
    })
    table["speedup_vs_fp32"] = teacher["p50_ms"] / table["p50_ms_1t"]
    return table.reset_index()


def markdown(table: pd.DataFrame, teacher: dict, cpu: dict) -> str:
    shown = pd.DataFrame({
        "order": table["order"].str.upper(),
        "accuracy (%)": [f"{m:.2f} ± {s:.2f}" for m, s in zip(table["acc_mean_pct"], table["acc_std_pct"])],
        "seeds": table["seeds"],
        "size (KB)": table["size_kb"].round(1),
        "p50 1 thread (ms)": table["p50_ms_1t"].round(3),
        "speed-up vs FP32": [f"{v:.2f}x" for v in table["speedup_vs_fp32"]],
    })
    return (f"# Order ablation: prune, quantize, distill in every order\n\n"
            f"All orders: sparse INT8 ONNX (QDQ), test split, ONNX Runtime {cpu['onnxruntime_version']}, batch 1, one thread, "
            f"timed interleaved with the FP32 teacher in one process. Accuracy: mean ± std over seeds.\n\n"
            f"FP32 teacher: {100 * teacher['test_acc']:.2f} %, {teacher['size_bytes'] / 1024:.1f} KB, "
            f"p50 {teacher['p50_ms']:.3f} ms.\n\n{shown.to_markdown(index=False)}\n\n"
            f"CPU: {cpu['cpu_model']}, {cpu['cpu_cores']} cores, AVX-512 VNNI {cpu['avx512_vnni']}, AMX {cpu['amx_int8']}.\n")


def plot(table: pd.DataFrame, runs: pd.DataFrame, teacher: dict, path: Path) -> None:
    """Accuracy per order: bars at the mean, error bars of one std, and each seed as a dot (two seeds hide little)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    position = {order: i for i, order in enumerate(table["order"])}
    ax.bar(range(len(table)), table["acc_mean_pct"], yerr=table["acc_std_pct"], capsize=4, color="tab:blue",
           alpha=0.8, label="mean ± std over seeds")
    ax.scatter(runs["order"].map(position), 100 * runs["test_acc"], color="black", s=12, zorder=3, label="one seed")
    ax.set_xticks(range(len(table)), table["order"].str.upper())
    ax.axhline(100 * teacher["test_acc"], color="tab:gray", linestyle="--", label="FP32 teacher")
    low = min(100 * runs["test_acc"].min(), (table["acc_mean_pct"] - table["acc_std_pct"]).min(),
              100 * teacher["test_acc"]) - 2
    ax.set_ylim(max(0, low), 100.5)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Order ablation: sparse INT8 models")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8, frameon=False)
    save_figure(fig, path)


def log_runs(runs: pd.DataFrame, teacher: dict, parent_run_id: str) -> None:
    """One MLflow run per (order, seed), nested under `parent_run_id`, with accuracy and latency."""
    import mlflow
    from mlflow.entities import Metric
    client = mlflow.MlflowClient()
    exp_id = mlflow.get_run(parent_run_id).info.experiment_id
    for r in runs.itertuples():
        run = client.create_run(exp_id, run_name=f"{r.order}/seed{r.seed}",
                                tags={"mlflow.parentRunId": parent_run_id, "distillery.kind": "ablation-result",
                                      "distillery.recipe": "ablation", "ablation.order": r.order,
                                      "ablation.seed": str(r.seed), "onnx.path": str(ablation_model(r.order, r.seed))})
        values = {"test_acc": r.test_acc, "p50_ms_1t": r.p50_ms, "p90_ms_1t": r.p90_ms, "mean_ms_1t": r.mean_ms,
                  "speedup_p50": r.speedup_p50, "size_bytes": r.size_bytes, "teacher_p50_ms_1t": teacher["p50_ms"]}
        now = int(pd.Timestamp.now().timestamp() * 1000)
        client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])
        client.set_terminated(run.info.run_id)


def main() -> None:
    cfg = load_section("ablation")
    opset = load_section("export").opset
    meta, _, _, (x_test, y_test) = load_prepared(PREPARED)
    teacher_model, _ = load_model(TEACHER)
    with tracking.stage_run("ablation_report", {"warmup": cfg.warmup, "runs": cfg.runs, "orders": ",".join(cfg.orders)},
                            recipe="ablation") as run:
        export_fp32_onnx(teacher_model, (torch.zeros(input_shape(meta)),), TEACHER_ONNX, opset)
        orders = {o: cfg.for_order(o).seeds for o in cfg.orders}
        runs, teacher = measure(orders, TEACHER_ONNX, x_test, y_test, cfg.warmup, cfg.runs)
        table = summarise(runs, teacher)
        cpu = cpu_info()
        write_text(REPORT_MD, markdown(table, teacher, cpu))
        write_text(REPORT_CSV, table.to_csv(index=False, float_format="%.4f"))
        plot(table, runs, teacher, REPORT_PNG)
        write_json(metrics("ablation_report"), {"teacher": teacher, "cpu": cpu,
                                                    "orders": table.set_index("order").to_dict(orient="index"),
                                                    "runs": runs.to_dict(orient="records")})
        log_runs(runs, teacher, os.environ.get(tracking.PARENT_ENV) or run.info.run_id)
        tracking.log_metrics({f"teacher.{k}": v for k, v in teacher.items()} |
                             {f"{o}.{k}": v for o, row in table.set_index("order").to_dict(orient="index").items()
                              for k, v in row.items()})
        tracking.log_artifacts([REPORT_MD, REPORT_CSV, REPORT_PNG], "reports")
        print(REPORT_MD.read_text())


if __name__ == "__main__":
    run_stage(main)
