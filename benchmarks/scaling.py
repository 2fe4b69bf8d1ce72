"""How cost grows with the work: the FP32 teacher, the fastest PTQ peer (ONNX Runtime static U8S8 after
`quant_pre_process`, per-channel; the fastest peer in reports/pqd.md) and our deployed P->Q->D
student, exported at input sizes 16, 32, 64 and 128 px and batches 1, 8 and 32, timed in ONE process with
ONNX Runtime at one thread (and all cores with --all-cores).

    python -m benchmarks.scaling             # after `make run`; ~10 minutes on two cores

Writes benchmarks/results/scaling.md, .json and .png (latency per image against input size, one line per
model and batch) with the CPU line. The models are fully convolutional, so one checkpoint serves every size;
the peer is calibrated on the same seeded calibration subset, resized.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from distillery.compress.checkpoint import load_compressed
from distillery.compress.ptq import quantize_ptq
from distillery.compress.qat import export_int8_onnx
from distillery.core.params import load_section
from distillery.core.plotting import pyplot, save_figure
from distillery.data import calibration_subset, load_prepared
from distillery.latency import cpu_info, time_models
from distillery.onnx_export import export_fp32_onnx
from tasks.paths import CHECKPOINTS, PREPARED

RESULTS = Path("benchmarks/results")
SIZES, BATCHES = (16, 32, 64, 128), (1, 8, 32)
MODELS = ("fp32 teacher", "ORT static U8S8 (fastest peer)", "our P->Q->D student")


def resize(x: np.ndarray, size: int) -> np.ndarray:
    return F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False).numpy()


def export_all(teacher, student, ckpt, calib: np.ndarray, size: int, batch: int, work: Path) -> dict[str, Path]:
    example = torch.zeros(batch, calib.shape[1], size, size)
    fp32 = export_fp32_onnx(teacher, (example,), work / f"teacher_{size}_{batch}.onnx")
    calib_x = resize(calib, size)
    if len(calib_x) < batch:
        calib_x = np.concatenate([calib_x] * (batch // len(calib_x) + 1))
    peer = quantize_ptq(fp32, work / f"peer_{size}_{batch}.onnx", calib_x)
    if ckpt.get("qat"):
        ours = export_int8_onnx(student, example, work / f"student_{size}_{batch}.onnx")
    else:  # quantize.method: ptq: the student is FP32 until ORT's quantizer, as the export stage does it
        ours = quantize_ptq(export_fp32_onnx(student, (example,), work / f"student_fp32_{size}_{batch}.onnx"),
                            work / f"student_{size}_{batch}.onnx", calib_x)
    return dict(zip(MODELS, (fp32, peer, ours)))


def plot(df: pd.DataFrame, path: Path, cpu_line: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.4))
    colours = dict(zip(MODELS, ("tab:gray", "tab:orange", "tab:blue")))
    styles = dict(zip(BATCHES, ("-", "--", ":")))
    for (model, batch), g in df.groupby(["model", "batch"], sort=False):
        ax.plot(g["size_px"], g["ms_per_image_1t"], styles[batch], marker="o", ms=3, color=colours[model],
                label=f"{model}, batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(SIZES, [str(s) for s in SIZES])
    ax.set_xlabel("input size [px]")
    ax.set_ylabel("p50 latency per image [ms], 1 thread")
    ax.set_title(f"Cost against work. {cpu_line}", fontsize=7)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=1)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--all-cores", action="store_true", help="also time at all cores")
    args = parser.parse_args()
    for name in ("teacher", "distilled"):
        if not CHECKPOINTS[name].exists():
            raise SystemExit(f"{CHECKPOINTS[name]} is missing: run `make run` first")
    _, train, _, _ = load_prepared(PREPARED)
    calib, calib_hash = calibration_subset(train[0], load_section("quantize").calibration_size, seed=0)
    teacher, _ = load_compressed(CHECKPOINTS["teacher"])
    student, ckpt = load_compressed(CHECKPOINTS["distilled"])
    threads = [1, 0] if args.all_cores else [1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            for batch in BATCHES:
                paths = export_all(teacher, student, ckpt, calib, size, batch, Path(tmp))
                sample = np.random.default_rng(0).random((batch, calib.shape[1], size, size), dtype=np.float32)
                res = {t: time_models(paths, sample, t, args.warmup, args.runs, batch=batch) for t in threads}
                for model in MODELS:
                    row = {"model": model, "size_px": size, "batch": batch}
                    for t, r in res.items():
                        label = "all" if t == 0 else str(t)
                        row[f"p50_ms_{label}t"] = r[model]["p50_ms"]
                        row[f"ms_per_image_{label}t"] = r[model]["p50_ms"] / batch
                        row[f"images_per_s_{label}t"] = 1000 * batch / r[model]["p50_ms"]
                        row[f"speedup_{label}t"] = r[MODELS[0]]["p50_ms"] / r[model]["p50_ms"]
                    rows.append(row)
                print(f"scaling: {size} px, batch {batch}: " + ", ".join(
                    f"{m} {res[1][m]['p50_ms']:.3f} ms" for m in MODELS))
    df = pd.DataFrame(rows)
    cpu = cpu_info()
    cpu_line = (f"{cpu['cpu_model']}, {cpu['cpu_cores']} cores, AVX-512 VNNI {cpu['avx512_vnni']}, AMX-INT8 "
                f"{cpu['amx_int8']}, ONNX Runtime {cpu['onnxruntime_version']}")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"CPU: {cpu_line}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scaling.json").write_text(json.dumps({"rows": rows, "cpu": cpu, "runs": args.runs,
                                                      "calibration_sha256": calib_hash}, indent=2) + "\n")
    (RESULTS / "scaling.md").write_text("# Cost against work\n\n" + df.to_markdown(index=False, floatfmt=".3f")
                                        + f"\n\nCPU: {cpu_line}. p50 of one batch; speed-up against the FP32 teacher "
                                          "at the same size and batch, all timed in one process.\n")
    plot(df, RESULTS / "scaling.png", cpu_line)


if __name__ == "__main__":
    main()
