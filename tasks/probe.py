"""Stage `probe`: PPCL step 1, residual linear probes `l_i(X) = X + X W_i + b_i` for every block.

Traces the PPCL teacher on the first `probe.calibration_size` of ppcl_teacher's calibration inputs,
fits one probe per block and stream in closed form (ridge; optional fine-tuning), logs the relative fit
error of every block (MLflow, `metrics/ppcl_probe.json`) and saves the probes with those calibration
inputs, one file: `models/ppcl/probes.pt`.
"""
from __future__ import annotations

import torch

from distillery.core.artifacts import atomic_path, write_json
from distillery.core.params import load_section
from distillery.core.errors import run_stage
from distillery.ppcl.source import load_inputs_file, load_teacher
from tasks.paths import PPCL_INPUTS as INPUTS, PPCL_TEACHER as TEACHER, PROBES, metrics

METRICS = metrics("ppcl_probe")


def main() -> None:
    from distillery.core import tracking
    from distillery.ppcl.adapter import trace
    from distillery.ppcl.hf import adapter_for
    from distillery.ppcl.hf import resolve_device
    from distillery.ppcl.probes import ProbeConfig, fit_probes
    cfg = load_section("probe")
    device = resolve_device(load_section("ppcl_teacher").device)
    teacher, _ = load_teacher(TEACHER)
    adapter = adapter_for(teacher)
    calibration, _, _ = load_inputs_file(INPUTS)
    with tracking.stage_run("probe", cfg.model_dump()):
        calib = calibration.take(slice(0, cfg.calibration_size))
        tr = trace(teacher.to(device), adapter, calib.to(device))
        probes, errors = fit_probes(tr, adapter, ProbeConfig(ridge=cfg.ridge, finetune_steps=cfg.finetune_steps,
                                                             lr=cfg.lr, seed=cfg.seed))
        streams = adapter.streams
        per_block = {f"block_{i}": {s: float(errors[i, k]) for k, s in enumerate(streams)} for i in range(len(errors))}
        with atomic_path(PROBES) as tmp, open(tmp, "wb") as f:
            torch.save({"probes": [{k: v.cpu() for k, v in p.state_dict().items()} for p in probes],
                        "errors": torch.as_tensor(errors), "streams": list(streams),
                        "calibration": calib.state()}, f)
        write_json(METRICS, {"fit_error": per_block, "mean_fit_error": {s: float(errors[:, k].mean())
                                                                        for k, s in enumerate(streams)}})
        for i in range(len(errors)):
            tracking.log_metrics({f"fit_error.{s}": float(errors[i, k]) for k, s in enumerate(streams)}, step=i)
        print(f"probe: relative fit error per block ({' / '.join(streams)}):")
        for i in range(len(errors)):
            print(f"  block {i:2d}: " + " / ".join(f"{errors[i, k]:.4f}" for k in range(errors.shape[1])))
        print(f"-> {PROBES}")


if __name__ == "__main__":
    run_stage(main)
