"""Stage `ppcl_teacher`: the text-to-image MMDiT that PPCL compresses, trained by flow matching.

Trains on the prepared train + val digits (de-standardised, resized to the MMDiT's 8x8, in
[-1, 1]) with a caption per image; writes `models/ppcl/teacher.pt` (rebuilt by
`distillery.models.load_model`), a sample grid per prompt (`reports/ppcl/teacher_samples.png`, one
column per digit) and `metrics/ppcl_teacher.json` with the prompt adherence that the foundation
classifier (`models/teacher.pt`) measures.
"""
from __future__ import annotations

import torch

from distillery.core.artifacts import save_checkpoint, write_json
from distillery.core.params import load_section
from distillery.core.errors import run_stage
from distillery.ppcl.digits import diffusion_data, grouped_by_digit, load_classifier, prompts, save_grid
from tasks.paths import PPCL_REPORTS as REPORTS, PPCL_TEACHER as TEACHER, PREPARED, TEACHER as CLASSIFIER, metrics

METRICS = metrics("ppcl_teacher")


def model_spec(cfg) -> dict:
    return {"arch": "mmdit", "width": cfg.width, "depth": cfg.depth, "in_channels": 1, "image_size": 8}


def main() -> None:
    from distillery.core import tracking
    from distillery.models import build_model
    from distillery.ppcl.flow_matching import FlowConfig, train_flow_matching
    from distillery.ppcl.quality import adherence, sample_prompts
    cfg = load_section("ppcl_teacher")
    spec = model_spec(cfg)
    x, y = diffusion_data(PREPARED, spec["image_size"])
    classifier = load_classifier(CLASSIFIER, PREPARED)
    with tracking.stage_run("ppcl_teacher", cfg.model_dump()):
        torch.manual_seed(cfg.seed)
        model = build_model(spec)
        flow = FlowConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, ema_decay=cfg.ema_decay,
                          caption_dropout=cfg.caption_dropout, seed=cfg.seed)
        hist = train_flow_matching(model, x, y, flow, desc="ppcl teacher")
        for rec in hist.steps:
            tracking.log_metrics({"loss": rec["loss"]}, step=rec["step"])
        labels, tokens, noise = prompts(cfg.prompts_per_digit, cfg.seed)
        images = sample_prompts(model, tokens, noise, cfg.sample_steps, cfg.guidance)
        adh = adherence(images, labels, classifier)
        metrics = {"final_loss": hist.steps[-1]["loss"] if hist.steps else float("nan"), "seconds": hist.seconds,
                   "adherence": adh, "train_images": len(x), "params": sum(p.numel() for p in model.parameters())}
        save_checkpoint(TEACHER, model, spec, metrics=metrics)
        save_grid(grouped_by_digit(images, labels), REPORTS / "teacher_samples.png")
        write_json(METRICS, metrics)
        tracking.log_metrics(metrics)
        print(f"ppcl_teacher: {cfg.steps} steps in {hist.seconds:.0f} s, loss {metrics['final_loss']:.4f}, "
              f"adherence {adh:.3f} -> {TEACHER}")


if __name__ == "__main__":
    run_stage(main)
