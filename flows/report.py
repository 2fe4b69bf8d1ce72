"""The cross-run report: every model of every pipeline run in MLflow, side by side.

One row per (pipeline run, model) for each pipeline run that executed `evaluate` or `benchmark`:
accuracy from the evaluate run, size, the share of MACs in INT8, latencies and speed-up from the
benchmark run, and the params of every stage; an INT8 model that is not faster than the FP32
teacher is flagged in a note, never left out. A stage the pipeline reused (DVC found it unchanged)
has no run of its own in that pipeline run; its figures and params are those of the same recipe's
latest earlier run of that stage, which is what DVC reused. Every figure is copied from an MLflow metric, never recomputed.
Stage runs outside the flow (plain `dvc repro`) count as pipeline runs of their own.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from distillery.core.errors import DistilleryError
from distillery.core.plotting import pyplot, save_figure

ACCURACY_STAGE, LATENCY_STAGE = "evaluate", "benchmark"  # the stages that log per-model metrics
FIGURES = {  # report column -> MLflow metric name, per model
    "accuracy": "{m}.accuracy",
    "size_bytes": "{m}.size_bytes",
    "int8_mac_share": "{m}.int8_mac_share",
    "p50_ms_1t": "{m}.threads_1.p50_ms",
    "p50_ms_all": "{m}.threads_all.p50_ms",
    "speedup_1t": "{m}.threads_1.speedup_p50",
    "speedup_all": "{m}.threads_all.speedup_p50",
}
OUT = Path("reports")


class ReportError(DistilleryError):
    """Nothing in MLflow to report on."""


def load_runs(experiment: str | None = None) -> pd.DataFrame:
    """Every run of the experiment (all kinds), as MLflow's search_runs table."""
    import mlflow

    from distillery.core import tracking
    name = experiment or tracking.experiment_name()
    if mlflow.get_experiment_by_name(name) is None:
        raise ReportError(f"no MLflow experiment {name!r} at {mlflow.get_tracking_uri()}; run a pipeline first")
    return mlflow.search_runs(experiment_names=[name], max_results=100_000)


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df else pd.Series([None] * len(df), index=df.index, dtype=object)


def gather(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (pipeline run, model), figures and params carried over from reused stages."""
    stages = runs[_col(runs, "tags.distillery.kind") == "stage"].copy()
    if stages.empty:
        return pd.DataFrame()
    parents = runs.set_index("run_id")
    stages["group"] = _col(stages, "tags.mlflow.parentRunId").fillna(stages["run_id"])
    stages["recipe"] = stages["group"].map(_col(parents, "tags.distillery.recipe")).fillna(_col(stages, "tags.distillery.recipe")).fillna("-")
    stages["group_start"] = stages["group"].map(_col(parents, "start_time")).fillna(stages["start_time"])
    stages = stages.sort_values(["group_start", "start_time"])
    latest: dict[str, dict[str, pd.Series]] = {}  # recipe -> stage -> its latest run
    rows = []
    for group, members in stages.groupby("group", sort=False):
        recipe = members["recipe"].iloc[0]
        state = latest.setdefault(recipe, {})
        for _, run in members.iterrows():
            state[run["tags.distillery.stage"]] = run
        if not ({ACCURACY_STAGE, LATENCY_STAGE} & set(members["tags.distillery.stage"])):
            continue
        acc, bench = state.get(ACCURACY_STAGE), state.get(LATENCY_STAGE)
        models = []
        for run, pattern in ((acc, r"metrics\.(.+)\.accuracy$"), (bench, r"metrics\.(.+)\.threads_1\.p50_ms$")):
            if run is not None:
                models += [m.group(1) for c in run.index if (m := re.match(pattern, c)) and pd.notna(run[c])]
        params = {c.removeprefix("params."): v for run in state.values() for c, v in run.items()
                  if c.startswith("params.") and pd.notna(v)}
        commit = next((r.get("tags.git.commit") for r in (bench, acc) if r is not None), None)
        for model in dict.fromkeys(models):
            row = {"recipe": recipe, "model": model, "pipeline_run": group,
                   "start_time": members["group_start"].iloc[0], "git_commit": commit,
                   "evaluate_run": None if acc is None else acc["run_id"],
                   "benchmark_run": None if bench is None else bench["run_id"]}
            for col, metric in FIGURES.items():
                source = acc if col == "accuracy" else bench
                key = "metrics." + metric.format(m=model)
                row[col] = source[key] if source is not None and key in source.index else None
            rows.append({**row, **{f"param.{k}": v for k, v in params.items()}})
    return pd.DataFrame(rows)


def pareto(df: pd.DataFrame) -> pd.Series:
    """True for rows no other row beats on both accuracy (higher) and p50 at one thread (lower)."""
    acc, lat = df["accuracy"].astype(float), df["p50_ms_1t"].astype(float)
    known = acc.notna() & lat.notna()
    front = []
    for i in df.index:
        if not known[i]:
            front.append(False)
            continue
        better = known & (acc >= acc[i]) & (lat <= lat[i]) & ((acc > acc[i]) | (lat < lat[i]))
        front.append(not better.any())
    return pd.Series(front, index=df.index)


def not_faster(rows: pd.DataFrame) -> pd.Series:
    """'⚠ not faster than FP32 (x0.87 at 1T)' for an INT8 model no faster than the teacher; '' otherwise."""
    int8 = rows["int8_mac_share"].astype(float).fillna(0) > 0
    notes = []
    for i in rows.index:
        speedups = {"1T": rows.at[i, "speedup_1t"], "all cores": rows.at[i, "speedup_all"]}
        slow = [f"x{float(v):.2f} at {label}" for label, v in speedups.items() if pd.notna(v) and float(v) <= 1.0]
        notes.append(f"⚠ not faster than FP32 ({', '.join(slow)})" if int8[i] and slow else "")
    return pd.Series(notes, index=rows.index, dtype=object)


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """The report's table: differing params only, the Pareto flag and warnings, newest run first."""
    if rows.empty:
        return rows
    params = [c for c in rows if c.startswith("param.")]
    differing = [c for c in params if rows[c].astype(str).nunique(dropna=False) > 1]
    cols = ["model", "recipe", *differing, "accuracy", "size_bytes", "int8_mac_share", "p50_ms_1t", "p50_ms_all",
            "speedup_1t", "speedup_all", "pareto", "note", "pipeline_run", "evaluate_run", "benchmark_run",
            "git_commit", "start_time"]
    table = rows.assign(pareto=pareto(rows), note=not_faster(rows))
    return table[cols].sort_values(["start_time", "recipe", "model"], ascending=[False, True, True]).reset_index(drop=True)


def markdown(table: pd.DataFrame) -> str:
    shown = pd.DataFrame({
        "model": table["model"], "recipe": table["recipe"],
        **{c.removeprefix("param."): table[c] for c in table if c.startswith("param.")},
        "accuracy %": 100 * table["accuracy"].astype(float),
        "size KiB": table["size_bytes"].astype(float) / 1024,
        "INT8 MACs %": 100 * table["int8_mac_share"].astype(float),
        "p50 1T ms": table["p50_ms_1t"].astype(float),
        "p50 all ms": table["p50_ms_all"].astype(float),
        "speed-up 1T": table["speedup_1t"].astype(float),
        "Pareto": table["pareto"].map({True: "*", False: ""}),
        "note": table["note"],
        "run": table["pipeline_run"].str[:8],
        "date": pd.to_datetime(table["start_time"], utc=True).dt.strftime("%Y-%m-%d %H:%M"),
    })
    return ("# Distillery: all runs\n\n"
            f"{len(table)} model results from {table['pipeline_run'].nunique()} pipeline run(s). Latency: ONNX "
            "Runtime, batch 1, p50; speed-up = the teacher's p50 / the model's, timed in the same process. "
            "INT8 MACs: share of the MACs in Conv/Gemm/MatMul nodes fed by INT8 DequantizeLinear on both "
            "inputs; a model with INT8 MACs that is not faster than the FP32 teacher on this CPU carries a ⚠ note. "
            "Params: only those that differ between runs. `*`: on the Pareto front of accuracy against "
            "p50 at one thread (no other result is both as accurate and as fast).\n\n"
            + shown.to_markdown(index=False, floatfmt=".3f", missingval="-") + "\n")


def plot(table: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    data = table.dropna(subset=["accuracy", "p50_ms_1t"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (recipe, group), colour in zip(data.groupby("recipe"), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 9):
        ax.scatter(group["p50_ms_1t"], 100 * group["accuracy"], color=colour, label=recipe, s=28, zorder=3)
    front = data[data["pareto"]].sort_values("p50_ms_1t")
    ax.step(front["p50_ms_1t"], 100 * front["accuracy"], where="post", color="black", lw=1, ls="--", zorder=2,
            label="Pareto front")
    ax.scatter(front["p50_ms_1t"], 100 * front["accuracy"], s=110, facecolors="none", edgecolors="black", zorder=4)
    for _, r in front.iterrows():
        ax.annotate(r["model"], (r["p50_ms_1t"], 100 * r["accuracy"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("latency p50, batch 1, 1 thread [ms] (ONNX Runtime)")
    ax.set_ylabel("test accuracy [%]")
    ax.set_title("Accuracy against latency, every run", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_report(root: Path | str = ".", out: Path | str = OUT) -> dict[str, Path]:
    """Gather every run from the project's MLflow store; write summary.md, .csv and .png under `out`."""
    from distillery.core import tracking
    from distillery.core.artifacts import atomic_path, write_text
    root = Path(root).resolve()
    tracking.quiet_telemetry()
    import mlflow
    mlflow.set_tracking_uri(tracking.tracking_uri(root))
    table = summary(gather(load_runs()))
    if table.empty:
        raise ReportError(f"no {ACCURACY_STAGE} or {LATENCY_STAGE} runs in MLflow at {mlflow.get_tracking_uri()}; "
                          "run a pipeline first")
    out = root / out
    paths = {"md": out / "summary.md", "csv": out / "summary.csv", "png": out / "summary.png"}
    write_text(paths["md"], markdown(table))
    with atomic_path(paths["csv"]) as tmp:
        table.to_csv(tmp, index=False)
    plot(table, paths["png"])
    return paths
