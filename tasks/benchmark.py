"""Stage `benchmark`: every model of the PQD report timed in one process with the FP32 teacher.

The models: the recipe's steps (teacher, pruned, quantized, distilled = the deployed student), the
P->Q->D student with the other pruning method (stage `counterpart`) and each post-training peer's model
(stage `baselines`). ONNX Runtime, batch 1, at each `benchmark.threads` (0 = all cores): p50 / p90 / p99;
throughput (images / s) at a batch of `benchmark.batch`; size, parameters, non-zeros, MACs and the share
of them in INT8; ratios to the teacher. With the accuracies from `evaluate`: the table
(`reports/pqd.md`, `.csv`) with a row for every peer (one that failed says why), the verdict against the
fastest and the most accurate peer, where the time goes in the teacher and the deployed student (ORT's
profiler by operator kind, the effective INT8 rate against this CPU's peak), and the accuracy-against-
latency plot (`reports/pqd_tradeoff.png`). An INT8 model no faster than the teacher is flagged, not hidden.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from distillery.core import tracking
from distillery.core.artifacts import atomic_path, write_json, write_text
from distillery.core.errors import run_stage
from distillery.core.params import load_section
from distillery.core.plotting import pyplot, save_figure
from distillery.data import load_split
from distillery.latency import benchmark, time_models
from distillery.onnx_export import load_session, onnx_stats
from distillery.profiling import cpu_clock_ghz, int8_peak_ops, time_breakdown
from tasks.paths import DEPLOYED, PQD_REPORT as REPORT, PQD_TRADEOFF, PREPARED, compared_models, metrics

METRICS = metrics("benchmark")
ACCURACY = metrics("evaluate")
PEER_RECORD = metrics("baselines")
BASELINE = "teacher"
DEPLOYED_STUDENT = "distilled"
PROFILED = ("teacher", DEPLOYED_STUDENT)
TIE = 0.02  # two timings of one graph in one process differed by up to 2 % here (README): closer is a tie


def not_faster(r: dict) -> str:
    """'⚠ not faster than FP32 (x0.87 at 1T)' for an INT8 model (some MACs in INT8) no faster than the teacher."""
    labels = {key: "all cores" if key == "threads_all" else f"{key.removeprefix('threads_')}T"
              for key in r if key.startswith("threads_")}
    slow = [f"x{r[key]['speedup_p50']:.2f} at {label}" for key, label in labels.items() if r[key]["speedup_p50"] <= 1.0]
    return f"⚠ not faster than FP32 ({', '.join(slow)})" if r.get("int8_mac_share") and slow else ""


def describe(name: str, peers: dict) -> tuple[str, str]:
    """(kind, what) of a model: ours (a step of the recipe) or a peer (its tool and version)."""
    if name in peers:
        p = peers[name]
        return "peer", f"{p.get('label', name)}, {p.get('package', '?')} {p.get('version', '?')}"
    if name.startswith("distilled_"):
        return "ours", f"P->Q->D, {name.removeprefix('distilled_')} pruning (stage counterpart)"
    return "ours", {"teacher": "FP32 teacher", "pruned": "pruned, FP32", "quantized": "pruned + INT8",
                    DEPLOYED_STUDENT: "P->Q->D student (deployed)"}.get(name, name)


def table(result: dict, accuracy: dict, peers: dict | None = None) -> pd.DataFrame:
    """One row per model: accuracy, size, params, MACs and their INT8 share, p50 / p90 and speed-up per thread
    count, throughput at the batch, warnings; then a row per peer that produced no model, saying why."""
    peers = peers or {}
    rows = []
    for name, r in result["models"].items():
        kind, what = describe(name, peers)
        row = {"model": name, "kind": kind, "what": what, "accuracy_pct": 100 * accuracy[name]["accuracy"],
               "size_kib": r["size_bytes"] / 1024, "params": r["params"], "nonzero_params": r["nonzero_params"],
               "mmacs": r["macs"] / 1e6, "int8_macs_pct": 100 * r.get("int8_mac_share", 0.0)}
        for key, t in r.items():
            if key.startswith("threads_"):
                label = key.removeprefix("threads_")
                row[f"p50_ms_{label}t"] = t["p50_ms"]
                row[f"p90_ms_{label}t"] = t["p90_ms"]
                row[f"speedup_{label}t"] = t["speedup_p50"]
        for key, t in r.items():
            if key.startswith("batch"):
                batch, _, label = key.removeprefix("batch").partition("_threads_")
                row[f"img_s_b{batch}_{label}t"] = t.get("images_per_s")
        row["note"] = not_faster(r) or r.get("note", "")
        rows.append(row)
    for name, p in peers.items():
        if p.get("status") != "ok":
            kind, what = describe(name, peers)
            rows.append({"model": name, "kind": kind, "what": what,
                         "note": "off (baselines.peers)" if p["status"] == "off" else f"failed: {p.get('error', '?')}"})
    return pd.DataFrame(rows)


def verdict(df: pd.DataFrame, n_test: int) -> list[str]:
    """The deployed student against the fastest and the most accurate peer, at one thread: win or say where not."""
    peers = df[(df["kind"] == "peer") & df["accuracy_pct"].notna()]
    ours = df[df["model"] == DEPLOYED_STUDENT]
    lat = next((c for c in df.columns if c.startswith("p50_ms_")), None)
    if peers.empty or ours.empty or lat is None:
        return ["No peer produced a model to compare with."] if ours.size else []
    s, label = ours.iloc[0], lat.removeprefix("p50_ms_").removesuffix("t")
    fastest, best = peers.loc[peers[lat].idxmin()], peers.loc[peers["accuracy_pct"].idxmax()]
    ratio = fastest[lat] / s[lat]
    images = round((s["accuracy_pct"] - best["accuracy_pct"]) * n_test / 100)
    threads = f"{label} thread{'s' if label != '1' else ''}"
    return [f"- Speed (p50 at {threads}): the deployed student is {ratio:.2f}x the fastest peer "
            f"({fastest['model']}: {fastest[lat]:.3f} ms against {s[lat]:.3f} ms): "
            + ("at least as fast." if ratio >= 1 else
               f"slower by {100 * (1 - ratio):.1f} %, within the {100 * TIE:.0f} % by which identical graphs differ "
               "from one timing to the next: a tie." if ratio >= 1 - TIE else "SLOWER."),
            f"- Accuracy: {s['accuracy_pct']:.2f} % against the most accurate peer's {best['accuracy_pct']:.2f} % "
            f"({best['model']}): {images:+d} of {n_test} test images: "
            + ("at least as accurate." if images >= 0 else "LESS accurate.")]


def markdown(df: pd.DataFrame, floatfmt: str) -> str:
    """The table as markdown, figures a row does not have (a failed peer's, say) left empty rather than 'nan'."""
    return df.astype(object).where(df.notna(), None).to_markdown(index=False, floatfmt=floatfmt, missingval="")


def profile_table(rows: dict[str, dict]) -> pd.DataFrame:
    out = []
    for name, r in rows.items():
        top = ", ".join(f"{o['op_type']} {100 * o['share']:.0f} %" for o in r["top_ops"][:3])
        out.append({"model": name, **{k: v for k, v in r.items() if k != "top_ops"}, "top_ops": top})
    return pd.DataFrame(out)


def plot(df: pd.DataFrame, cpu: str, path: Path) -> None:
    plt = pyplot()
    from matplotlib.ticker import FormatStrFormatter, FuncFormatter
    latency = next(c for c in df.columns if c.startswith("p50_ms_"))
    df = df[df[latency].notna()]
    speedup = latency.replace("p50_ms", "speedup")
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    steps = df[df["model"].isin(list(DEPLOYED))]
    ax.plot(steps[latency], steps["accuracy_pct"], "o-", color="tab:blue", label="ours: the recipe's steps")
    other = df[df["model"].str.startswith("distilled_")]
    ax.plot(other[latency], other["accuracy_pct"], "D", color="tab:blue", mfc="white", label="ours: other pruning")
    peers = df[df["kind"] == "peer"]
    ax.plot(peers[latency], peers["accuracy_pct"], "s", color="tab:orange", label="post-training peers")
    placed: list[tuple[float, float]] = []
    for _, r in df.sort_values(latency).iterrows():  # models at the same spot get their labels stacked, not overlaid
        x, y = float(np.log10(r[latency])), float(r["accuracy_pct"])
        k = sum(abs(x - px) < 0.12 and abs(y - py) < 0.15 for px, py in placed)
        placed.append((x, y))
        ax.annotate(f"{r['model']} {r[speedup]:.2f}x", (r[latency], r["accuracy_pct"]), textcoords="offset points",
                    xytext=(6, -3 - 9 * k), fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.set_xlabel(f"latency p50, batch 1, {latency.removeprefix('p50_ms_').replace('t', '')} thread(s) [ms, log]")
    ax.set_ylabel("test accuracy [%] (ONNX Runtime)")
    ax.set_title(f"Prune -> Quantize -> Distill against post-training quantizers\n{cpu}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def batched(x: np.ndarray, batch: int) -> np.ndarray:
    """`batch` test images (repeated when the split holds fewer)."""
    return np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])), np.float32)


def throughput(models: dict[str, Path], x: np.ndarray, cfg, result: dict) -> None:
    """Images / s at a batch of `cfg.batch` per thread count into `result`; a model whose ONNX fixes a
    different batch gets a note instead."""
    fixed = {}
    for name, path in models.items():
        dim = load_session(path, 1).get_inputs()[0].shape[0]
        if isinstance(dim, int) and dim != cfg.batch:
            fixed[name] = dim
            result["models"][name]["note"] = f"its ONNX takes batches of {dim} only: no throughput at {cfg.batch}"
    timed = {n: p for n, p in models.items() if n not in fixed}
    sample = batched(x, cfg.batch)
    for t in cfg.threads:
        label = "all" if t == 0 else str(t)
        for name, r in time_models(timed, sample, t, min(cfg.warmup, 5), cfg.batch_runs, batch=cfg.batch).items():
            r["images_per_s"] = cfg.batch / (r["p50_ms"] / 1e3)
            result["models"][name][f"batch{cfg.batch}_threads_{label}"] = r


def caption(cpu: dict, cfg, peak: dict) -> str:
    return (f"CPU: {cpu['cpu_model']} ({cpu['cpu_cores']} cores, AVX-512 VNNI {cpu['avx512_vnni']}, AVX-VNNI "
            f"{cpu['avx_vnni']}, AMX-INT8 {cpu['amx_int8']}; clock {peak['ghz'] or 0:.2f} GHz from /proc/cpuinfo), "
            f"ONNX Runtime {cpu['onnxruntime_version']}. Latency: batch 1, {cfg.runs} runs after {cfg.warmup} "
            f"warm-up, all models interleaved in one process; speed-up = teacher p50 / model p50; img_s_b"
            f"{cfg.batch}: images / s at a batch of {cfg.batch} (p50 of {cfg.batch_runs} runs). int8_macs_pct = share "
            f"of the MACs in Conv/Gemm/MatMul nodes fed by INT8 DequantizeLinear on both inputs. Peers quantize the "
            f"FP32 teacher's ONNX with quantize's seeded calibration subset (metrics/baselines.json).")


def profile_caption(peak: dict, threads: int) -> str:
    vnni = f"{peak['vnni_ops'] / 1e9:.0f} GOPS" if peak["vnni_ops"] else "unknown (no clock in /proc/cpuinfo)"
    return (f"ONNX Runtime's profiler, {threads} thread(s), batch 1: kernel time per run by kind (int8 kernels such "
            f"as QLinearConv / QGemm, fp32 kernels, Quantize/DequantizeLinear, layout reorders). int8_gops = 2 x the "
            f"graph's INT8 MACs / INT8 kernel time (empty when ORT runs a MAC operator in FP32). Peak = ops per "
            f"cycle and core (AVX-512 VNNI: 64 u8 x s8 MACs per vpdpbusd on 2 ports = 256 ops; AVX2 / AVX-VNNI: "
            f"128; AMX: 2048, not used by ORT's CPU kernels) x {threads} core(s) x the clock: VNNI peak {vnni}.")


def main() -> None:
    cfg = load_section("benchmark")
    x, _ = load_split(PREPARED, "test")
    models = compared_models()
    for path in models.values():
        load_session(path, 1)  # a corrupt model fails here, before minutes of timing
    accuracy = json.loads(ACCURACY.read_text())
    missing = sorted(set(models) - set(accuracy))
    if missing:
        raise FileNotFoundError(f"{ACCURACY} has no accuracy for {missing}: re-run `dvc repro evaluate`")
    peers = json.loads(PEER_RECORD.read_text())["peers"] if PEER_RECORD.exists() else {}
    with tracking.stage_run("benchmark", cfg.model_dump()):
        result = benchmark(models, BASELINE, x, cfg.threads, cfg.warmup, cfg.runs)
        throughput(models, x, cfg, result)
        for name, path in models.items():
            result["models"][name].update(onnx_stats(path))
        cpu = result["cpu"]
        threads = cfg.threads[0] or cpu["cpu_cores"]
        peak = int8_peak_ops(cpu, threads, cpu_clock_ghz())
        result["peak"] = peak
        if cfg.profile_runs:
            result["profile"] = {n: time_breakdown(models[n], x[:1], threads, cfg.profile_runs, peak) for n in PROFILED}
        write_json(METRICS, result)
        df = table(result, accuracy, peers)
        lines = verdict(df, int(accuracy[BASELINE]["n"]))
        figures = markdown(df.drop(columns=["params", "nonzero_params"], errors="ignore"), ".3f")
        text = (f"# Prune -> Quantize -> Distill\n\n{figures}\n\n{caption(cpu, cfg, peak)}\n\n"
                "## Against the post-training peers\n\n" + "\n".join(lines) + "\n")
        if "profile" in result:
            text += ("\n## Where the time goes\n\n" + markdown(profile_table(result["profile"]), ".2f")
                     + f"\n\n{profile_caption(peak, threads)}\n")
        write_text(REPORT.with_suffix(".md"), text)
        with atomic_path(REPORT.with_suffix(".csv")) as tmp:
            df.to_csv(tmp, index=False)
        plot(df, cpu["cpu_model"], PQD_TRADEOFF)
        tracking.set_tags({f"cpu.{k}": str(v) for k, v in cpu.items()})
        tracking.log_metrics(result["models"])
        tracking.log_artifacts([REPORT.with_suffix(".md"), REPORT.with_suffix(".csv"), PQD_TRADEOFF], "reports")
        print(df.drop(columns=["what"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print("\n".join(lines))
        print(caption(cpu, cfg, peak))


if __name__ == "__main__":
    run_stage(main)
