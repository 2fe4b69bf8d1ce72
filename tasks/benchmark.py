"""Stage `benchmark`: CPU latency of every step's deployed model, in one process with the teacher.

ONNX Runtime, batch 1, at each `benchmark.threads` (0 = all cores); p50/p90/p99/mean, size,
parameters, non-zeros, MACs and the share of them that runs in INT8; the CPU and its INT8 flags;
ratios to the FP32 teacher. With the accuracies from `evaluate`, the recipe's table
(`reports/pqd.md`, `.csv`) and its accuracy-against-latency plot (`reports/pqd_tradeoff.png`). An
INT8 model that is not faster than the teacher on this CPU is flagged in the table, never hidden.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from distillery.core import tracking
from distillery.core.artifacts import atomic_path, write_json, write_text
from distillery.core.errors import run_stage
from distillery.core.params import load_section
from distillery.core.plotting import pyplot, save_figure
from distillery.data import load_split
from distillery.latency import benchmark
from distillery.onnx_export import load_session, onnx_stats
from tasks.paths import DEPLOYED, PQD_REPORT as REPORT, PQD_TRADEOFF, PREPARED, metrics

METRICS = metrics("benchmark")
ACCURACY = metrics("evaluate")
BASELINE = "teacher"


def not_faster(r: dict) -> str:
    """'⚠ not faster than FP32 (x0.87 at 1T)' for an INT8 model (some MACs in INT8) no faster than the teacher."""
    labels = {key: "all cores" if key == "threads_all" else f"{key.removeprefix('threads_')}T"
              for key in r if key.startswith("threads_")}
    slow = [f"x{r[key]['speedup_p50']:.2f} at {label}" for key, label in labels.items() if r[key]["speedup_p50"] <= 1.0]
    return f"⚠ not faster than FP32 ({', '.join(slow)})" if r.get("int8_mac_share") and slow else ""


def table(result: dict, accuracy: dict) -> pd.DataFrame:
    """One row per step: accuracy, size, params, non-zeros, MACs and their INT8 share, latency, speed-up, warnings."""
    rows = []
    for name, r in result["models"].items():
        row = {"step": name, "file": str(DEPLOYED.get(name, "")), "accuracy_pct": 100 * accuracy[name]["accuracy"],
               "size_kib": r["size_bytes"] / 1024, "params": r["params"], "nonzero_params": r["nonzero_params"],
               "mmacs": r["macs"] / 1e6, "int8_macs_pct": 100 * r.get("int8_mac_share", 0.0)}
        for key, t in r.items():
            if key.startswith("threads_"):
                label = key.removeprefix("threads_")
                row[f"p50_ms_{label}t"] = t["p50_ms"]
                row[f"speedup_{label}t"] = t["speedup_p50"]
        row["note"] = not_faster(r)
        rows.append(row)
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, cpu: str, path: Path) -> None:
    plt = pyplot()
    latency = next(c for c in df.columns if c.startswith("p50_ms_"))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(df[latency], df["accuracy_pct"], "o-", color="tab:blue")
    for _, r in df.iterrows():
        ax.annotate(f"{r['step']}\n{r[latency.replace('p50_ms', 'speedup')]:.2f}x", (r[latency], r["accuracy_pct"]),
                    textcoords="offset points", xytext=(6, -4), fontsize=8)
    ax.set_xlabel(f"latency p50, batch 1, {latency.removeprefix('p50_ms_').replace('t', '')} thread(s) [ms]")
    ax.set_ylabel("test accuracy [%] (ONNX Runtime)")
    ax.set_title(f"Prune -> Quantize -> Distill\n{cpu}", fontsize=9)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    cfg = load_section("benchmark")
    x, _ = load_split(PREPARED, "test")
    for path in DEPLOYED.values():
        load_session(path, 1)  # a corrupt model fails here, before minutes of timing
    accuracy = json.loads(ACCURACY.read_text())
    with tracking.stage_run("benchmark", cfg.model_dump()):
        result = benchmark(DEPLOYED, BASELINE, x, cfg.threads, cfg.warmup, cfg.runs)
        for name, path in DEPLOYED.items():
            result["models"][name].update(onnx_stats(path))
        write_json(METRICS, result)
        df = table(result, accuracy)
        cpu = result["cpu"]
        caption = (f"CPU: {cpu['cpu_model']} ({cpu['cpu_cores']} cores, AVX-512 VNNI {cpu['avx512_vnni']}, "
                   f"AMX-INT8 {cpu['amx_int8']}), ONNX Runtime {cpu['onnxruntime_version']}, batch 1; "
                   f"speed-up = teacher p50 / model p50, timed in one process; int8_macs_pct = share of the "
                   f"MACs in Conv/Gemm/MatMul nodes fed by INT8 DequantizeLinear on both inputs.")
        write_text(REPORT.with_suffix(".md"), "# Prune -> Quantize -> Distill\n\n"
                   + df.to_markdown(index=False, floatfmt=".3f") + f"\n\n{caption}\n")
        with atomic_path(REPORT.with_suffix(".csv")) as tmp:
            df.to_csv(tmp, index=False)
        plot(df, cpu["cpu_model"], PQD_TRADEOFF)
        tracking.set_tags({f"cpu.{k}": str(v) for k, v in cpu.items()})
        tracking.log_metrics(result["models"])
        tracking.log_artifacts([REPORT.with_suffix(".md"), REPORT.with_suffix(".csv"), PQD_TRADEOFF], "reports")
        print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(caption)


if __name__ == "__main__":
    run_stage(main)
