"""Side by side, in ONE process, on the same test split: what a user gets from each route to INT8.

1. the FP32 teacher (`models/teacher.fp32.onnx`),
2. the teacher through ONNX Runtime's `quantize_static` with its defaults (what one does by hand),
3. the peers configured as their docs recommend, on the same seeded calibration subset: ORT static QDQ
   after `quant_pre_process`, per-channel INT8 weights, INT8 (S8S8) or UINT8 (U8S8, = our PTQ)
   activations; NNCF's `nncf.quantize` on the ONNX model,
4. our P->Q->D with unstructured pruning,
5. our P->Q->D with structured (channel) pruning,

each timed with ONNX Runtime, batch 1, at one thread and all cores, as ratios to the teacher.
The two P->Q->D students are built here from `models/teacher.pt` with the `prune`, `quantize`
and `distill` sections of params.yaml (method overridden), by the library's chain
(`distillery.compress.chain.run_order`), whose steps are the ones the stages call.

    python -m benchmarks.pqd_side_by_side            # after `make run`; a few minutes on two cores
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch

from distillery.compress.chain import ChainConfig, run_order
from distillery.compress.ptq import quantize_nncf, quantize_ort_defaults, quantize_ptq
from distillery.compress.qat import export_int8_onnx
from distillery.core.params import load_section
from distillery.data import calibration_subset, input_shape, load_prepared
from distillery.latency import benchmark
from distillery.models import load_model
from distillery.onnx_export import onnx_accuracy, onnx_stats
from tasks.paths import DEPLOYED, PREPARED, TEACHER

WORK = Path("benchmarks/work")
RESULTS = Path("benchmarks/results")
TEACHER_ONNX = DEPLOYED["teacher"]


def build_pqd(method: str, teacher, meta, train, val, calib_x) -> Path:
    """Prune (method), QAT, distill from the teacher with the recipe's params; export the INT8 student."""
    example = torch.zeros(input_shape(meta))
    p, q, d = (load_section(s) for s in ("prune", "quantize", "distill"))
    if len({p.batch_size, q.batch_size, d.batch_size}) > 1 or len({p.seed, q.seed, d.seed}) > 1:
        sys.exit("the chain uses one batch_size and one seed for P, Q and D: make prune, quantize and distill agree "
                 f"(batch_size {p.batch_size}/{q.batch_size}/{d.batch_size}, seed {p.seed}/{q.seed}/{d.seed})")
    cfg = ChainConfig(method=method, sparsity=p.sparsity, ratio=p.ratio, prune_epochs=p.finetune_epochs,
                      qat_epochs=q.epochs, kd_epochs=d.epochs, prune_lr=p.lr, qat_lr=q.lr, kd_lr=d.lr,
                      batch_size=q.batch_size, temperature=d.temperature, alpha=d.alpha,
                      freeze_observers_epoch=q.freeze_observers_epoch)
    student = run_order(teacher, "pqd", cfg, train, val, calib_x, example, seed=p.seed)
    return export_int8_onnx(student, example, WORK / f"pqd_{method}.int8.onnx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    if not TEACHER_ONNX.exists():
        sys.exit(f"{TEACHER_ONNX} is missing: run `make run` (or `dvc repro export`) first")
    meta, train, val, (x_test, y_test) = load_prepared(PREPARED)
    teacher, _ = load_model(TEACHER)
    calib_x, calib_hash = calibration_subset(train[0], load_section("quantize").calibration_size, seed=0)
    WORK.mkdir(parents=True, exist_ok=True)
    paths = {
        "fp32 teacher": TEACHER_ONNX,
        "ORT quantize_static defaults": quantize_ort_defaults(TEACHER_ONNX, WORK / "ort_defaults.onnx", calib_x),
        "ORT static S8S8 (pre-processed, per-channel)": quantize_ptq(TEACHER_ONNX, WORK / "ort_s8s8.onnx", calib_x,
                                                                     activations="s8"),
        "ORT static U8S8 (pre-processed, per-channel) = our PTQ": quantize_ptq(TEACHER_ONNX, WORK / "ptq.onnx", calib_x),
        "NNCF nncf.quantize (ONNX)": quantize_nncf(TEACHER_ONNX, WORK / "nncf.onnx", calib_x),
        "our P->Q->D unstructured": build_pqd("unstructured", teacher, meta, train, val, calib_x),
        "our P->Q->D structured": build_pqd("structured", teacher, meta, train, val, calib_x),
    }
    accuracy = {name: {"accuracy": onnx_accuracy(path, x_test, y_test)} for name, path in paths.items()}
    timing = benchmark(paths, "fp32 teacher", x_test, [1, 0], args.warmup, args.runs)
    rows = []
    for name, path in paths.items():
        t, stats = timing["models"][name], onnx_stats(path)
        rows.append({"model": name, "accuracy_pct": 100 * accuracy[name]["accuracy"],
                     "size_kib": stats["size_bytes"] / 1024, "mmacs": stats["macs"] / 1e6,
                     "p50_ms_1t": t["threads_1"]["p50_ms"], "speedup_1t": t["threads_1"]["speedup_p50"],
                     "p50_ms_allt": t["threads_all"]["p50_ms"], "speedup_allt": t["threads_all"]["speedup_p50"]})
    df = pd.DataFrame(rows)
    cpu = timing["cpu"]
    cpu_line = (f"{cpu['cpu_model']}, {cpu['cpu_cores']} cores, AVX-512 VNNI {cpu['avx512_vnni']}, AMX-INT8 "
                f"{cpu['amx_int8']}, ONNX Runtime {cpu['onnxruntime_version']}")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"CPU: {cpu_line}; calibration subset sha256 {calib_hash[:16]}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pqd_side_by_side.json").write_text(json.dumps(
        {"rows": rows, "cpu": cpu, "cpu_line": cpu_line, "runs": args.runs, "warmup": args.warmup,
         "calibration_sha256": calib_hash, "params": {s: load_section(s).model_dump() for s in ("prune", "quantize", "distill")}},
        indent=2) + "\n")
    (RESULTS / "pqd_side_by_side.md").write_text(
        "# P->Q->D side by side\n\n" + df.to_markdown(index=False, floatfmt=".3f") + f"\n\nCPU: {cpu_line}. Batch 1; "
        "speed-up = FP32 teacher p50 / model p50, all timed in one process.\n")


if __name__ == "__main__":
    main()
