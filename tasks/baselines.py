"""Stage `baselines`: the FP32 teacher's ONNX quantized by each post-training quantizer a user would pick
instead (`baselines.peers`: ONNX Runtime U8S8 and S8S8, NNCF, Olive), calibrated on the very subset the
project's own quantization uses (`quantize.calibration_size`, `quantize.seed`; its sha256 is recorded).

Writes `models/baselines/<peer>.int8.onnx` for every peer that produced a model ONNX Runtime runs, and
`metrics/baselines.json` with a record per peer: ok (INT8 initialisers, seconds), failed (why) or off.
A peer that fails is a row of the report, not a failed stage; `evaluate` and `benchmark` take the rest.
"""
from __future__ import annotations

import shutil

from distillery.compress.peers import run_peer
from distillery.core import tracking
from distillery.core.artifacts import write_json
from distillery.core.errors import run_stage
from distillery.core.params import load_section
from distillery.data import calibration_subset, load_split
from distillery.onnx_export import load_session
from tasks.paths import BASELINES, DEPLOYED, PREPARED, baseline_model, metrics


def main() -> None:
    cfg = load_section("baselines")
    quantize = load_section("quantize")
    teacher = DEPLOYED["teacher"]
    load_session(teacher, 1)  # a missing or corrupt teacher is the stage's error, not every peer's
    calib_x, calib_hash = calibration_subset(load_split(PREPARED, "train")[0], quantize.calibration_size, quantize.seed)
    shutil.rmtree(BASELINES, ignore_errors=True)  # as `dvc repro` would: no peer of an earlier run survives
    BASELINES.mkdir(parents=True)
    params = {**cfg.model_dump(), "calibration_size": quantize.calibration_size, "calibration_seed": quantize.seed}
    with tracking.stage_run("baselines", params, recipe="pqd"):
        record = {}
        for name, on in cfg.peers.items():
            if not on:
                record[name] = {"peer": name, "status": "off"}
                continue
            print(f"baselines: {name} ...", flush=True)
            row = record[name] = run_peer(name, teacher, baseline_model(name), calib_x)
            if row["status"] == "ok":
                tracking.log_onnx_model(baseline_model(name), name)
                print(f"baselines: {name:<9} {row['package']} {row['version']}: {row['int8_weight_initializers']} INT8 "
                      f"weight initialisers in {row['seconds']:.1f} s -> {baseline_model(name)}")
            else:
                print(f"baselines: {name:<9} FAILED after {row['seconds']:.1f} s: {row['error']}")
        write_json(metrics("baselines"), {"calibration_sha256": calib_hash, "calibration_size": int(len(calib_x)),
                                          "peers": record})
        tracking.set_tags({"calibration_sha256": calib_hash} |
                          {f"peer.{n}": r.get("error", r["status"])[:250] for n, r in record.items()})
        tracking.log_metrics({f"{n}.seconds": r["seconds"] for n, r in record.items() if "seconds" in r})


if __name__ == "__main__":
    run_stage(main)
