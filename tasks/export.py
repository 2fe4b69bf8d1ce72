"""Stage `export`: every deployed model as ONNX; the teacher's FP32 export is `models/teacher.fp32.onnx`."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tasks.artifacts import load_model
from tasks.config import load_section
from tasks.errors import run_stage
from tasks.onnx_export import export_fp32_onnx

PREPARED = Path("data/prepared")
TEACHER_CKPT = Path("models/teacher.pt")
DEPLOYED = {"teacher": Path("models/teacher.fp32.onnx")}  # name -> deployed file, in report order


def example_input(meta: dict) -> torch.Tensor:
    return torch.zeros(1, meta["in_channels"], meta["image_size"], meta["image_size"])


def main() -> None:
    from tasks import tracking
    cfg = load_section("export")
    meta = json.loads((PREPARED / "meta.json").read_text())
    with tracking.stage_run("export", cfg.model_dump()):
        model, _ = load_model(TEACHER_CKPT)
        path = export_fp32_onnx(model, (example_input(meta),), DEPLOYED["teacher"], cfg.opset)
        tracking.log_onnx_model(path, "teacher")
        print(f"export: teacher -> {path}")


if __name__ == "__main__":
    run_stage(main)
