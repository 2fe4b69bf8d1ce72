"""Where the time goes: ONNX Runtime's profiler per operator kind for the FP32 teacher, the deployed
P->Q->D student, the counterpart student and the PTQ peers of the `baselines` stage, with the share of
MACs in INT8 and the effective INT8 rate against this CPU's peak (`distillery.profiling.time_breakdown`; the
PQD report's "Where the time goes" table is the same measurement for the teacher and the deployed student).

    python -m benchmarks.where_time_goes            # after `make run`; under a minute

Writes benchmarks/results/where_time_goes.md and .json; prints the table and the CPU line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from distillery.data import load_prepared
from distillery.latency import cpu_info
from distillery.profiling import cpu_clock_ghz, int8_peak_ops, time_breakdown
from tasks.paths import DEPLOYED, PREPARED, compared_models

RESULTS = Path("benchmarks/results")
SKIP = ("pruned", "quantized")  # the recipe's intermediate steps: the teacher, students and peers are what matter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    missing = [str(p) for p in (DEPLOYED["teacher"], DEPLOYED["distilled"]) if not p.exists()]
    if missing:
        raise SystemExit(f"{', '.join(missing)} missing: run `make run` first")
    _, _, _, (x_test, _) = load_prepared(PREPARED)
    cpu = cpu_info()
    peak = int8_peak_ops(cpu, args.threads or cpu["cpu_cores"], cpu_clock_ghz())
    rows, top = [], {}
    for name, path in compared_models().items():
        if name in SKIP:
            continue
        if not path.exists():
            continue
        r = time_breakdown(path, x_test[:1], args.threads or cpu["cpu_cores"], args.runs, peak)
        top[name] = r.pop("top_ops")
        rows.append({"model": name, **r})
    df = pd.DataFrame(rows)
    cpu_line = (f"{cpu['cpu_model']}, {cpu['cpu_cores']} cores, AVX-512 VNNI {cpu['avx512_vnni']}, AMX-INT8 "
                f"{cpu['amx_int8']}, ONNX Runtime {cpu['onnxruntime_version']}; {args.threads or cpu['cpu_cores']} "
                f"thread(s), batch 1; clock {peak['ghz'] or 0:.2f} GHz (/proc/cpuinfo), VNNI peak "
                f"{(peak['vnni_ops'] or 0) / 1e9:.0f} GOPS for these threads")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"CPU: {cpu_line}")
    lines = [f"| {name} | " + ", ".join(f"{r['op_type']} {r['us_per_run']:.0f} us ({100 * r['share']:.0f} %)"
                                      for r in rows_) + " |" for name, rows_ in top.items()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "where_time_goes.json").write_text(json.dumps({"rows": rows, "top_ops": top, "cpu": cpu, "peak": peak,
                                                               "runs": args.runs, "threads": args.threads}, indent=2) + "\n")
    (RESULTS / "where_time_goes.md").write_text(
        "# Where the time goes\n\n" + df.to_markdown(index=False, floatfmt=".2f")
        + "\n\nKernel time per run from ONNX Runtime's profiler, by kind: int8 kernels (QLinearConv, QGemm, ...), "
          "fp32 kernels, Quantize/DequantizeLinear, layout reorders. int8_macs_pct: MACs whose inputs are INT8 in "
          "the graph; int8_gops = 2 x those MACs / INT8 kernel time, left empty where ORT runs some MAC op in FP32 "
          "(a QDQ node it does not fuse) and the rate would be made up. Peak: see distillery.profiling.int8_peak_ops."
          "\n\n"
          "| model | top operators per run |\n|---|---|\n" + "\n".join(lines) + f"\n\nCPU: {cpu_line}.\n")


if __name__ == "__main__":
    main()
