"""Stage `export`: every step's deployed form as ONNX, each checked in ONNX Runtime.

The teacher and the pruned model as FP32; the quantized and the distilled student as real INT8
(INT8 weight initialisers, UINT8 activations in QDQ form; or ORT's static quantizer when
`quantize.method: ptq`). The final student is `models/pqd/student.int8.onnx`; the share of test
images on which ORT and the PyTorch fake-quant model agree is recorded in `metrics/export.json`.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from distillery.compress.checkpoint import load_compressed
from distillery.compress.ptq import quantize_ptq
from distillery.compress.qat import export_int8_onnx, int8_initializers
from distillery.core import tracking
from distillery.core.artifacts import write_json
from distillery.core.errors import run_stage
from distillery.core.params import load_section
from distillery.data import input_shape, load_prepared
from distillery.onnx_export import export_fp32_onnx, run_onnx
from tasks.paths import CHECKPOINTS, DEPLOYED, PREPARED, metrics


def export_int8(model: torch.nn.Module, ckpt: dict, example: torch.Tensor, path: Path, opset: int) -> Path:
    """QAT models through our INT8 exporter; PTQ ones as FP32 then ONNX Runtime's static quantizer."""
    if ckpt.get("qat"):
        return export_int8_onnx(model, example, path, opset)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_fp32_onnx(model, (example,), Path(tmp) / "fp32.onnx", opset)
        return quantize_ptq(fp32, path, ckpt["calibration_x"].numpy())


def agreement(model: torch.nn.Module, path: Path, x: np.ndarray) -> float:
    """Share of inputs on which ORT's top-1 equals the PyTorch model's."""
    with torch.no_grad():
        expected = torch.cat([model(torch.from_numpy(x[i:i + 256])) for i in range(0, len(x), 256)]).argmax(1).numpy()
    return float((run_onnx(path, x).argmax(1) == expected).mean())


def main() -> None:
    cfg = load_section("export")
    meta, _, _, (x_test, _) = load_prepared(PREPARED)
    example = torch.zeros(input_shape(meta))
    with tracking.stage_run("export", cfg.model_dump()):
        record = {}
        for name, path in DEPLOYED.items():
            model, ckpt = load_compressed(CHECKPOINTS[name])
            if name in ("quantized", "distilled"):
                export_int8(model, ckpt, example, path, cfg.opset)
                record[name] = {"agreement_with_torch": agreement(model, path, x_test),
                                "int8_weight_initializers": len(int8_initializers(path))}
            else:
                export_fp32_onnx(model, (example,), path, cfg.opset)
                record[name] = {"agreement_with_torch": agreement(model, path, x_test)}
            tracking.log_onnx_model(path, name)
            print(f"export: {name:<10} -> {path}  (ORT agrees with torch on {100 * record[name]['agreement_with_torch']:.2f} %"
                  f" of test images)")
        write_json(metrics("export"), record)
        tracking.log_metrics(record)


if __name__ == "__main__":
    run_stage(main)
