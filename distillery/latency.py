"""The benchmark protocol: ONNX Runtime on the CPU, batch 1, warm-up then timed runs.

Models compared with each other are timed in one process, interleaved in rounds so that a
neighbour's load on a shared machine falls on all of them alike, and reported as ratios.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np


def cpu_info() -> dict:
    """CPU model and the flags that decide INT8 speed (VNNI, AMX), with the ORT version."""
    import onnxruntime as ort
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpu_cores": os.cpu_count() or 1,
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "amx_int8": "amx_int8" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "onnxruntime_version": ort.__version__,
    }


def session(path: Path | str, threads: int):
    """An ORT CPU session; `threads=0` means all cores."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def summarise(times_s: list[float]) -> dict:
    ms = np.asarray(times_s) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "runs": int(len(ms))}


def time_models(paths: dict[str, Path | str], sample: np.ndarray, threads: int, warmup: int, runs: int,
                rounds: int = 5, batch: int = 1) -> dict[str, dict]:
    """Latency of one batch of `batch` (default 1) for every model at `threads`, interleaved in `rounds`
    within this process."""
    sessions = {name: session(p, threads) for name, p in paths.items()}
    feeds = {name: {s.get_inputs()[0].name: sample[:batch]} for name, s in sessions.items()}
    for name, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for name, s in sessions.items():
            feed = feeds[name]
            for _ in range(per_round):
                t0 = time.perf_counter()
                s.run(None, feed)
                times[name].append(time.perf_counter() - t0)
    return {name: summarise(t) for name, t in times.items()}


def benchmark(paths: dict[str, Path | str], baseline: str, sample: np.ndarray, threads: list[int],
              warmup: int, runs: int) -> dict:
    """Latencies of every model at every thread count, with ratios to `baseline` (>1 = faster)."""
    if baseline not in paths:
        raise ValueError(f"baseline {baseline!r} is not among the models {sorted(paths)}")
    out: dict = {"cpu": cpu_info(), "models": {name: {} for name in paths}}
    for t in threads:
        label = "all" if t == 0 else str(t)
        res = time_models(paths, sample, t, warmup, runs)
        base = res[baseline]["p50_ms"]
        for name, r in res.items():
            r["speedup_p50"] = base / r["p50_ms"]
            r["threads"] = t or (os.cpu_count() or 1)
            out["models"][name][f"threads_{label}"] = r
    return out


def time_runners(runners: dict[str, Callable[[], object]], warmup: int, runs: int, rounds: int = 5) -> dict[str, dict]:
    """Latency of zero-argument callables (one forward each), interleaved in `rounds` within this process;
    the caller sets the thread count (torch.set_num_threads, or the sessions it wraps)."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runners}
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for name, fn in runners.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: summarise(t) for name, t in times.items()}


def benchmark_runners(make: Callable[[int], dict[str, Callable[[], object]]], baseline: str, threads: list[int],
                      warmup: int, runs: int) -> dict:
    """`benchmark` for any runtime: `make(threads)` returns the callables timed at that thread count
    (0 = all cores), with ratios to `baseline` (>1 = faster)."""
    out: dict = {"cpu": cpu_info(), "models": {}}
    for t in threads:
        label = "all" if t == 0 else str(t)
        runners = make(t)
        if baseline not in runners:
            raise ValueError(f"baseline {baseline!r} is not among the models {sorted(runners)}")
        res = time_runners(runners, warmup, runs)
        base = res[baseline]["p50_ms"]
        for name, r in res.items():
            r["speedup_p50"] = base / r["p50_ms"]
            r["threads"] = t or (os.cpu_count() or 1)
            out["models"].setdefault(name, {})[f"threads_{label}"] = r
    return out
