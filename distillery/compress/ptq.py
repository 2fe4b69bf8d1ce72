"""Post-training static quantization with ONNX Runtime's own tool, as baselines beside QAT.

`quantize_ptq` is ORT's recommended configuration (QDQ, INT8 per-channel weights, UINT8 or INT8
activations, after ORT's pre-processing); `quantize_nncf` is NNCF's `nncf.quantize` on the ONNX model;
`quantize_ort_defaults` is `quantize_static` as a user would call it by hand (its defaults: per-tensor
weights, INT8 activations), for comparison.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from distillery.core.artifacts import atomic_path


class _ArrayReader:
    """ORT's CalibrationDataReader over an array, one sample per batch (the FP32 export's batch is fixed)."""

    def __init__(self, input_name: str, x: np.ndarray, batch_size: int):
        self.input_name, self.x, self.batch_size, self.i = input_name, np.ascontiguousarray(x, np.float32), batch_size, 0

    def get_next(self) -> dict | None:
        if self.i >= len(self.x):
            return None
        batch = self.x[self.i:self.i + self.batch_size]
        self.i += self.batch_size
        return {self.input_name: batch} if len(batch) == self.batch_size else None

    def rewind(self) -> None:
        self.i = 0


def _reader(fp32_onnx: Path | str, calib_x: np.ndarray) -> _ArrayReader:
    graph = onnx.load(str(fp32_onnx), load_external_data=False).graph
    inp = graph.input[0]
    batch = inp.type.tensor_type.shape.dim[0].dim_value or 1  # a symbolic batch reads as 0
    if len(calib_x) < batch:
        raise ValueError(f"{len(calib_x)} calibration samples; the model's batch is {batch}")
    return _ArrayReader(inp.name, calib_x, batch)


def quantize_ptq(fp32_onnx: Path | str, out_path: Path | str, calib_x: np.ndarray, per_channel: bool = True,
                 activations: str = "u8") -> Path:
    """Static QDQ quantization as ONNX Runtime's docs recommend for x86: `quant_pre_process` first, INT8
    weights (per channel), UINT8 (`u8`, "U8S8") or INT8 (`s8`, "S8S8") activations, MinMax on `calib_x`.

    Written to a temporary file and renamed onto `out_path`, like every artifact.
    """
    if activations not in ("u8", "s8"):
        raise ValueError(f"activations {activations!r}: u8 or s8")
    act = QuantType.QUInt8 if activations == "u8" else QuantType.QInt8
    with tempfile.TemporaryDirectory() as tmp, atomic_path(out_path) as out:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=True)  # folds BN, infers shapes
        quantize_static(str(pre), str(out), _reader(pre, calib_x), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=act, weight_type=QuantType.QInt8)
    return Path(out_path)


def quantize_nncf(fp32_onnx: Path | str, out_path: Path | str, calib_x: np.ndarray) -> Path:
    """NNCF's post-training quantization of the ONNX model (`nncf.quantize` with its defaults: its own
    min-max / bias correction, its CPU preset), calibrated on all of `calib_x`. NNCF's telemetry
    (openvino-telemetry, on unless a consent file says otherwise) sends nothing with `NNCF_CI` set, the only
    switch NNCF reads, set here before the import (openvino-telemetry still writes a client-id file under
    ~/intel when it loads)."""
    os.environ.setdefault("NNCF_CI", "1")
    import nncf
    model = onnx.load(str(fp32_onnx))
    reader = _reader(fp32_onnx, calib_x)
    batches = [b for b in iter(reader.get_next, None)]
    quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches))
    with atomic_path(out_path) as out:
        onnx.save(quantized, str(out))
    return Path(out_path)


def quantize_ort_defaults(fp32_onnx: Path | str, out_path: Path | str, calib_x: np.ndarray) -> Path:
    """`quantize_static` with every default, as a user would run it by hand."""
    with atomic_path(out_path) as out:
        quantize_static(str(fp32_onnx), str(out), _reader(fp32_onnx, calib_x))
    return Path(out_path)
