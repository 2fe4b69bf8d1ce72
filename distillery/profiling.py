"""Where the time goes in an ONNX model on this CPU: ONNX Runtime's own profiler, summed per operator type.

`op_profile` runs a model `runs` times with profiling on and returns one row per operator type: its
kernel time per run, its share of all kernel time, and its kind:
- `int8`: kernels that compute on INT8 data (QLinearConv, QLinearMatMul, MatMulInteger, ...),
- `quant`: QuantizeLinear / DequantizeLinear (what a QDQ graph leaves unfused),
- `layout`: reorders between layouts (ORT's NCHWc ReorderInput / ReorderOutput, Transpose),
- `fp32`: everything else.
`int8_peak_ops` is this CPU's INT8 peak from its flags and clock (how: see its docstring), so that the
effective INT8 rate (2 x INT8 MACs / INT8 kernel time) can be set against it.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

INT8_OPS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "QLinearAdd", "QLinearMul",
            "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearLeakyRelu", "QLinearSigmoid",
            "QLinearSoftmax", "QLinearReduceMean", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention",
            "NhwcQLinearConv", "QLinearWhere", "QEmbedLayerNormalization"}
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
LAYOUT_OPS = {"ReorderInput", "ReorderOutput", "Transpose"}


def kind(op_type: str) -> str:
    if op_type in INT8_OPS:
        return "int8"
    if op_type in QUANT_OPS:
        return "quant"
    if op_type in LAYOUT_OPS:
        return "layout"
    return "fp32"


def op_profile(path: Path | str, sample: np.ndarray, threads: int = 1, warmup: int = 10, runs: int = 50) -> list[dict]:
    """Rows {op_type, kind, calls_per_run, us_per_run, share} sorted by time, from ORT's profiler (batch of
    `sample`, `threads` intra-op threads; 0 = all cores)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: np.ascontiguousarray(sample, np.float32)}
    for _ in range(warmup):  # untimed and unprofiled: the profile starts below
        sess.run(None, feed)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"ort_profile_{os.getpid()}")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        sess.run(None, feed)
    for _ in range(runs):
        sess.run(None, feed)
    trace = Path(sess.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink(missing_ok=True)
    total, calls = defaultdict(float), defaultdict(int)
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name") or re.sub(r"_kernel_time$", "", ev["name"])
            total[op] += ev.get("dur", 0)
            calls[op] += 1
    n = warmup + runs
    grand = sum(total.values()) or 1.0
    rows = [{"op_type": op, "kind": kind(op), "calls_per_run": calls[op] / n, "us_per_run": t / n,
             "share": t / grand} for op, t in total.items()]
    return sorted(rows, key=lambda r: -r["us_per_run"])


def kind_shares(rows: list[dict]) -> dict[str, float]:
    """Share of kernel time per kind (int8, quant, layout, fp32)."""
    out = {k: 0.0 for k in ("int8", "quant", "layout", "fp32")}
    for r in rows:
        out[r["kind"]] += r["share"]
    return out


def cpu_clock_ghz() -> float | None:
    """The highest base clock /proc/cpuinfo reports (MHz / 1000), None where it reports none."""
    try:
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
    except OSError:
        return None
    return max(mhz) / 1000 if mhz else None


def int8_peak_ops(flags: dict, cores: int, ghz: float | None) -> dict:
    """This CPU's INT8 peak in operations per second (a MAC = 2 operations), from its ISA and clock.

    Per core and cycle: AVX-512 VNNI `vpdpbusd` does 64 u8 x s8 MACs per 512-bit instruction, two FMA
    ports: 128 MACs = 256 ops; AVX2 / AVX-VNNI at 256 bits: half that; AMX (`tdpbusd` on the tile unit)
    1024 MACs = 2048 ops. ORT's CPU kernels use VNNI (they do not use AMX for these models), so the VNNI
    figure is the one the effective rate is measured against; the AMX figure is shown for scale. The
    clock is /proc/cpuinfo's, not the turbo clock: the peak is a round figure, not a guarantee.
    """
    if ghz is None:
        return {"ghz": None, "vnni_ops": None, "amx_ops": None}
    per_cycle = 256 if flags.get("avx512_vnni") else 128 if (flags.get("avx_vnni") or flags.get("avx2")) else 32
    return {"ghz": ghz, "vnni_ops": per_cycle * cores * ghz * 1e9,
            "amx_ops": 2048 * cores * ghz * 1e9 if flags.get("amx_int8") else None}


FP32_MAC_OPS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "NchwcConv"}


def time_breakdown(path: Path | str, sample: np.ndarray, threads: int, runs: int, peak: dict, top: int = 5) -> dict:
    """Where one model's time goes, for the report: kernel time per run, its shares by kind (INT8, FP32,
    Quantize/Dequantize, layout), the share of MACs in INT8 (`onnx_stats`), and the effective INT8 rate
    (2 x INT8 MACs / INT8 kernel time) against `peak["vnni_ops"]` (`int8_peak_ops`).

    The rate is left out (None) where ORT runs some MAC operator in FP32 beside INT8 ones (a QDQ node it
    does not fuse runs as DequantizeLinear + FP32 Conv): the graph's INT8 MACs would then not all be in
    the INT8 kernels' time and the rate would be made up.
    """
    from distillery.onnx_export import onnx_stats
    prof = op_profile(path, sample, threads=threads, runs=runs)
    shares, stats = kind_shares(prof), onnx_stats(path)
    int8_us = sum(r["us_per_run"] for r in prof if r["kind"] == "int8")
    fp32_mac_ops = [r["op_type"] for r in prof if r["kind"] == "fp32" and r["op_type"] in FP32_MAC_OPS]
    rate = 2 * stats["int8_macs"] / (int8_us * 1e-6) if int8_us and not fp32_mac_ops else None
    vnni = peak.get("vnni_ops")
    return {"kernel_us": sum(r["us_per_run"] for r in prof), "int8_pct": 100 * shares["int8"],
            "fp32_pct": 100 * shares["fp32"], "quant_dequant_pct": 100 * shares["quant"],
            "layout_pct": 100 * shares["layout"], "int8_macs_pct": 100 * stats["int8_mac_share"],
            "int8_gops": None if rate is None else rate / 1e9,
            "pct_of_vnni_peak": None if rate is None or not vnni else 100 * rate / vnni, "top_ops": prof[:top]}
