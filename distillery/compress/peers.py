"""The post-training quantizers a user would pick instead of QAT + KD, run on the same FP32 ONNX and
calibration subset, each through its own tool's public API.

    record = run_peer("nncf", "teacher.fp32.onnx", "nncf.int8.onnx", calib_x)
    # {"peer": "nncf", "status": "ok", "seconds": 2.1, "int8_weight_initializers": 20, ...}
    # or {"status": "failed", "error": "ValueError: ..."}: a peer that cannot quantize a model is a row
    # in the report saying why, never a crash of the run

A model counts only when ONNX Runtime loads and runs it on a calibration sample; a failed attempt leaves
no file behind.
"""
from __future__ import annotations

import importlib.metadata
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Peer:
    label: str  # how the report names it
    package: str  # the distribution whose version the report records
    quantize: Callable[[Path, Path, np.ndarray], Path]  # (fp32 onnx, out, calibration inputs) -> out


def _ort(activations: str) -> Callable[[Path, Path, np.ndarray], Path]:
    def quantize(fp32: Path, out: Path, calib_x: np.ndarray) -> Path:
        from distillery.compress.ptq import quantize_ptq
        return quantize_ptq(fp32, out, calib_x, per_channel=True, activations=activations)
    return quantize


def _nncf(fp32: Path, out: Path, calib_x: np.ndarray) -> Path:
    from distillery.compress.ptq import quantize_nncf
    return quantize_nncf(fp32, out, calib_x)


def _olive(fp32: Path, out: Path, calib_x: np.ndarray) -> Path:
    from distillery.compress.olive_ptq import quantize_olive
    return quantize_olive(fp32, out, calib_x)


PEERS: dict[str, Peer] = {
    "ort_u8s8": Peer("ORT static U8S8 (per-channel, pre-processed)", "onnxruntime", _ort("u8")),
    "ort_s8s8": Peer("ORT static S8S8 (per-channel, pre-processed)", "onnxruntime", _ort("s8")),
    "nncf": Peer("NNCF nncf.quantize (defaults)", "nncf", _nncf),
    "olive": Peer("Olive OnnxStaticQuantization", "olive-ai", _olive),
}


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_peer(name: str, fp32_onnx: Path | str, out_path: Path | str, calib_x: np.ndarray,
             peers: dict[str, Peer] | None = None) -> dict:
    """Quantize `fp32_onnx` with peer `name` into `out_path` and check that ORT runs the result.

    Returns a record with status "ok" (and the INT8 weight initialiser count) or "failed" (and the error,
    one line); any exception of the peer's tool is caught here and `out_path` removed.
    """
    from distillery.compress.qat import int8_initializers
    from distillery.onnx_export import load_session
    peer = (peers or PEERS)[name]
    out_path = Path(out_path)
    record = {"peer": name, "label": peer.label, "package": peer.package, "version": version(peer.package)}
    t0 = time.perf_counter()
    try:
        peer.quantize(Path(fp32_onnx), out_path, calib_x)
        sess = load_session(out_path, 1)
        sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(calib_x[:1], np.float32)})
        record |= {"status": "ok", "int8_weight_initializers": len(int8_initializers(out_path))}
    except Exception as err:  # any tool's failure on any model: a row saying why
        out_path.unlink(missing_ok=True)
        message = " ".join(str(err).split())[:300] or "(no message)"
        record |= {"status": "failed", "error": f"{type(err).__name__}: {message}"}
    record["seconds"] = time.perf_counter() - t0
    return record
