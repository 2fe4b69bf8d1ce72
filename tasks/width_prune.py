"""Stage `width_prune`: PPCL step 4, residual linear projectors in place of the most linear MLPs.

On the depth variant named by `width_prune.base_ratio` (assembled from the trained students, no
training; 0 = the teacher), every block's image FFN and text-stream MLP is scored by its linear
replacement error (least-squares projector, relative block-output error); the `ffn` image FFNs and
`text_mlp` text MLPs with the lowest error become `y = x + W x + b`, initialised by least squares
and (`steps` > 0) trained alone with L1 between L2-normalised block outputs. The whole pruned model
is saved as the `save_pretrained` folder `models/ppcl/width/`, its projectors listed in
`distillery_ppcl.json` (load it with `distillery.ppcl.hf.load_variant`).
"""
from __future__ import annotations

import json

from distillery.core.artifacts import write_json
from distillery.core.params import load_section
from distillery.core.errors import ArtifactError, run_stage
from distillery.ppcl.source import load_inputs_file, load_teacher
from distillery.ppcl.students import load_students
from tasks.paths import INTERVALS, PPCL_INPUTS as INPUTS, PPCL_TEACHER as TEACHER, STUDENTS, WIDTH, metrics

METRICS = metrics("ppcl_width")


def base_intervals(chosen: dict, base_ratio: float) -> list[tuple[int, int]]:
    if base_ratio == 0:
        return []
    key = f"{base_ratio:g}"
    if key not in chosen["selected"]:
        raise ArtifactError(f"width_prune.base_ratio = {base_ratio}: {INTERVALS} has no selection for it; "
                            f"use 0 or one of intervals.ratios ({', '.join(chosen['selected'])})")
    return [tuple(iv) for iv in chosen["selected"][key]]


def main() -> None:
    from distillery.core import tracking
    from distillery.ppcl.adapter import trace
    from distillery.ppcl.hf import adapter_for
    from distillery.ppcl.depth import assemble
    from distillery.ppcl.hf import resolve_device, save_variant
    from distillery.ppcl.width import WidthConfig, linearize_mlps, lowest_error_targets, mlp_linear_errors
    cfg = load_section("width_prune")
    device = resolve_device(load_section("ppcl_teacher").device)
    chosen = json.loads(INTERVALS.read_text())
    teacher, _ = load_teacher(TEACHER)
    adapter = adapter_for(teacher)
    calibration, _, _ = load_inputs_file(INPUTS)
    intervals = base_intervals(chosen, cfg.base_ratio)
    base = assemble(teacher, adapter, load_students(STUDENTS, teacher, adapter, intervals)).to(device)
    with tracking.stage_run("width_prune", cfg.model_dump()):
        data = calibration.take(slice(0, cfg.data_size)).to(device)
        tr = trace(base, adapter, data)
        calib = trace(base, adapter, data.take(slice(0, 256)))
        errors = mlp_linear_errors(base, adapter, calib, cfg.ridge)
        targets = sorted(lowest_error_targets(errors, cfg.text_mlp, stream=1) + lowest_error_targets(errors, cfg.ffn, stream=0))
        model, report = linearize_mlps(base, adapter, tr, targets, WidthConfig(ridge=cfg.ridge, steps=cfg.steps,
                                                                              lr=cfg.lr, batch_size=cfg.batch_size,
                                                                              seed=cfg.seed))
        n_blocks = len(adapter.blocks(model))
        record = {"base_ratio": cfg.base_ratio, "intervals": [list(iv) for iv in intervals],
                  "targets": [list(t) for t in targets], "linear_error": errors.tolist(), "report": report,
                  "params": sum(p.numel() for p in model.parameters()), "blocks": n_blocks}
        save_variant(model.cpu(), WIDTH, {k: v for k, v in record.items() if k not in ("report", "linear_error")})
        write_json(METRICS, record)
        tracking.log_metrics({f"block_{r['block']}.{r['stream']}.error_trained": r["error_trained"] for r in report})
        for r in report:
            print(f"width_prune: block {r['block']:2d} {r['stream']}: error {r['error_init']:.4f} (least squares) -> "
                  f"{r['error_trained']:.4f} (trained)")
        print(f"width_prune: {len(targets)} MLPs linearised on {n_blocks} blocks -> {WIDTH}")


if __name__ == "__main__":
    run_stage(main)
