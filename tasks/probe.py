"""Stage `probe`: PPCL step 1, residual linear probes `l_i(X) = X + X W_i + b_i` for every block.

Traces the PPCL teacher on a seeded calibration set of noisy inputs (x_t, t, caption), fits one
probe per block and stream in closed form (ridge; optional fine-tuning), logs the relative fit error
of every block (MLflow, `metrics/ppcl_probe.json`) and saves the probes with their calibration
inputs, one file: `models/ppcl/probes.pt`.
"""
from __future__ import annotations

import torch

from distillery.core.artifacts import atomic_path, write_json
from distillery.core.params import load_section
from distillery.core.errors import run_stage
from distillery.models import load_model
from distillery.ppcl.digits import diffusion_data
from tasks.paths import PPCL_TEACHER as TEACHER, PREPARED, PROBES, metrics

METRICS = metrics("ppcl_probe")


def main() -> None:
    from distillery.core import tracking
    from distillery.ppcl.adapter import MMDIT, trace
    from distillery.ppcl.flow_matching import noisy_inputs
    from distillery.ppcl.probes import ProbeConfig, fit_probes
    cfg = load_section("probe")
    teacher, _ = load_model(TEACHER)
    x, y = diffusion_data(PREPARED, teacher.image_size)
    with tracking.stage_run("probe", cfg.model_dump()):
        calib = noisy_inputs(x, y, cfg.calibration_size, seed=cfg.seed, caption_dropout=0.1)
        tr = trace(teacher, MMDIT, calib)
        probes, errors = fit_probes(tr, MMDIT, ProbeConfig(ridge=cfg.ridge, finetune_steps=cfg.finetune_steps,
                                                            lr=cfg.lr, seed=cfg.seed))
        per_block = {f"block_{i}": {s: float(errors[i, k]) for k, s in enumerate(MMDIT.streams)}
                     for i in range(len(errors))}
        with atomic_path(PROBES) as tmp, open(tmp, "wb") as f:
            torch.save({"probes": [p.state_dict() for p in probes], "errors": torch.as_tensor(errors),
                        "streams": list(MMDIT.streams), "calibration": list(calib)}, f)
        write_json(METRICS, {"fit_error": per_block, "mean_fit_error": {s: float(errors[:, k].mean())
                                                                        for k, s in enumerate(MMDIT.streams)}})
        for i in range(len(errors)):
            tracking.log_metrics({f"fit_error.{s}": float(errors[i, k]) for k, s in enumerate(MMDIT.streams)}, step=i)
        print("probe: relative fit error per block (img / txt):")
        for i in range(len(errors)):
            print(f"  block {i:2d}: " + " / ".join(f"{errors[i, k]:.4f}" for k in range(errors.shape[1])))
        print(f"-> {PROBES}")


if __name__ == "__main__":
    run_stage(main)
