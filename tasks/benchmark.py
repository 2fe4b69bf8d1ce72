"""Stage `benchmark`: CPU latency of every deployed model, in one process with its baseline.

ONNX Runtime, batch 1, at each `benchmark.threads` (0 = all cores); p50/p90/p99/mean, size,
parameters, non-zeros and MACs; the CPU and its INT8 flags. Ratios are to the FP32 teacher.
"""
from __future__ import annotations

from pathlib import Path

from tasks.artifacts import write_json
from tasks.config import load_section
from tasks.data import load_split
from tasks.errors import run_stage
from tasks.export import DEPLOYED, PREPARED
from tasks.latency import benchmark
from tasks.onnx_export import load_session, onnx_stats

METRICS = Path("metrics/benchmark.json")
BASELINE = "teacher"


def main() -> None:
    from tasks import tracking
    cfg = load_section("benchmark")
    x, _ = load_split(PREPARED, "test")
    for path in DEPLOYED.values():
        load_session(path, 1)  # a corrupt model fails here, before minutes of timing
    with tracking.stage_run("benchmark", cfg.model_dump()) as run:
        result = benchmark(DEPLOYED, BASELINE, x, cfg.threads, cfg.warmup, cfg.runs)
        for name, path in DEPLOYED.items():
            result["models"][name].update(onnx_stats(path))
        write_json(METRICS, result)
        import mlflow
        mlflow.set_tags({f"cpu.{k}": v for k, v in result["cpu"].items()})
        tracking.log_metrics(result["models"])
        for name, r in result["models"].items():
            cols = "  ".join(f"{k.removeprefix('threads_')}T p50 {v['p50_ms']:.3f} ms ({v['speedup_p50']:.2f}x)"
                             for k, v in r.items() if k.startswith("threads_"))
            print(f"benchmark: {name:<10} {cols}  {r['size_bytes'] / 1024:.0f} KiB  {r['params']} params  {r['macs'] / 1e6:.1f} MMACs")
        print(f"benchmark: {result['cpu']['cpu_model']}, ORT {result['cpu']['onnxruntime_version']}")


if __name__ == "__main__":
    run_stage(main)
