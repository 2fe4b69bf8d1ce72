"""Microsoft Olive's static quantization as one more post-training peer beside ORT's and NNCF's (ptq.py).

`quantize_olive` runs Olive's `OnnxStaticQuantization` pass through `olive.workflows.run`, configured for a
CPU as Olive and ORT recommend: QDQ, INT8 per-channel weights, UINT8 (`u8`) or INT8 (`s8`) activations,
ORT's pre-processing (Olive's `quant_preprocess`), MinMax over exactly the samples `quantize_ptq` would
see (`ptq._reader`: one batch of the model's fixed batch size at a time, an incomplete last batch dropped).

Olive is a workflow engine with process-wide side effects, so the run is fenced in:
- Telemetry: Olive 0.13 sends a heartbeat (an encrypted device id, OS name and version) and an event per
  workflow run to Microsoft's OneCollector, and writes a device id and a retry cache under
  ~/.cache/Microsoft/DeveloperTools/.onnxruntime. Its documented switch, OLIVE_DISABLE_TELEMETRY=1, is
  read only after the heartbeat has been queued, so it does not stop it; the telemetry singleton is off
  from the start only when it is first built with a CI variable set. `_telemetry_off` builds it that way
  (CI=1 for that one call, then restored) and sets OLIVE_DISABLE_TELEMETRY for good measure.
- Files: Olive's cache, output and temporary directories (tempfile.tempdir, which `olive.workflows.run`
  repoints for good) all lie in one TemporaryDirectory; nothing goes to the current directory or $HOME.
  While a run lasts, tempfile.tempdir is that directory for the whole process (other threads included).
- Global state: Olive sets OLIVE_CACHE_DIR, the levels of the `olive` and `onnxruntime` loggers, adds a
  stdout handler to the latter on every run and sets ORT's default C++ log severity; all are put back
  (the severity to ORT's default, as ORT has no getter).
- Failures: Olive logs a failed pass and returns no model rather than raising; its log records are
  captured and become the RuntimeError's message.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from distillery.compress.ptq import _reader
from distillery.core.artifacts import atomic_path
from distillery.models.factory import import_module

_PASS = "OnnxStaticQuantization"
_DATASET = "distillery_calibration_batches"
_DATALOADER = "distillery_prebatched"
_ORT_DEFAULT_LOG_SEVERITY = 2  # onnxruntime's own default (WARNING); nothing in this project changes it

# Calibration batches of the runs in flight, by key: Olive's data components are named in a JSON config,
# so the arrays stay here and the config carries the key (in-memory; no copy of the data on disk).
_BATCHES: dict[str, list[dict[str, np.ndarray]]] = {}


def _calibration_batches(key: str) -> list[dict[str, np.ndarray]]:
    """Olive load-dataset component: the batches `quantize_olive` stored under `key`."""
    return _BATCHES[key]


def _prebatched(dataset: list, **kwargs) -> list:
    """Olive dataloader component: the batches as they are (Olive's default would collate them in torch)."""
    return dataset


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _telemetry_off() -> None:
    """Build Olive's telemetry singleton disabled, before anything logs to it (see the module docstring)."""
    from olive.telemetry import Telemetry
    with _environ(CI="1"):
        Telemetry()  # a singleton: a later Telemetry() (Engine.run's @action) gets this disabled one


class _Records(logging.Handler):
    """Keeps Olive's warnings and errors, and the first exception they carry, for the error message."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        self.exception: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        self.exception = self.exception or exc
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")

    def failure(self, message: str) -> RuntimeError:
        """`message`, Olive's first exception and its last log lines, the exception chained as the cause."""
        if self.exception is not None:
            message += f": {type(self.exception).__name__}: {self.exception}"
        error = RuntimeError("\n".join([message, *self.lines[-10:]]))
        error.__cause__ = self.exception
        return error


@contextlib.contextmanager
def _quiet_and_restored(records: _Records) -> Iterator[None]:
    """Route Olive's log to `records` only, and put back the logging and ORT state Olive changes."""
    saved = {name: (logging.getLogger(name).level, logging.getLogger(name).handlers[:])
             for name in ("olive", "onnxruntime")}
    olive_logger = logging.getLogger("olive")
    olive_logger.handlers[:] = [records]
    try:
        yield
    finally:
        for name, (level, handlers) in saved.items():
            logging.getLogger(name).setLevel(level)
            logging.getLogger(name).handlers[:] = handlers
        import onnxruntime
        onnxruntime.set_default_logger_severity(_ORT_DEFAULT_LOG_SEVERITY)


def _olive_config(fp32_onnx: Path, key: str, activations: str, tmp: Path) -> dict:
    """One `OnnxStaticQuantization` pass on the CPU, no evaluation, every directory under `tmp`."""
    return {
        "input_model": {"type": "ONNXModel", "model_path": str(fp32_onnx)},
        "data_configs": [{
            "name": "calibration",
            "load_dataset_config": {"type": _DATASET, "params": {"key": key}},
            "dataloader_config": {"type": _DATALOADER},
        }],
        "passes": {"quantize": {
            "type": _PASS,
            "data_config": "calibration",
            "quant_format": "QDQ",
            "precision": "int8",  # weights
            "activation_type": "uint8" if activations == "u8" else "int8",
            "per_channel": True,
            "calibrate_method": "MinMax",
            "quant_preprocess": True,  # ORT's quant_pre_process, as quantize_ptq runs it
            "save_as_external_data": False,
        }},
        "evaluate_input_model": False,
        "cache_dir": str(tmp / "cache"),
        "output_dir": str(tmp / "output"),
        "log_severity_level": 2,  # warnings and errors reach `_Records`; nothing is printed
        "ort_log_severity_level": 3,
        "ort_py_log_severity_level": 3,
        "log_to_file": False,
    }


def quantize_olive(fp32_onnx: Path | str, out_path: Path | str, calib_x: np.ndarray,
                   activations: str = "u8") -> Path:
    """Olive's `OnnxStaticQuantization` of `fp32_onnx` (QDQ, per-channel INT8 weights, `u8` or `s8`
    activations, MinMax on `calib_x`), offline and without telemetry, written atomically to `out_path`.

    Raises RuntimeError with Olive's reason when it fails or produces no model; `out_path` is then untouched.
    """
    if activations not in ("u8", "s8"):
        raise ValueError(f"activations {activations!r}: u8 or s8")
    fp32_onnx = Path(fp32_onnx)
    if not fp32_onnx.is_file():
        raise FileNotFoundError(f"{fp32_onnx}: no such ONNX model")
    reader = _reader(fp32_onnx, calib_x)  # the same batches as quantize_ptq; too few samples is a ValueError
    batches = list(iter(reader.get_next, None))

    os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
    try:
        # torchmetrics, which Olive imports, imports torchvision: PyPI's CUDA build of it needs the CPU-torch fix
        olive_workflows = import_module("olive.workflows")
        from olive.data.registry import Registry
    except Exception as e:  # a broken dependency raises anything at import (RuntimeError from torchvision)
        raise RuntimeError(f"Olive could not be imported: {type(e).__name__}: {e}") from e
    _telemetry_off()
    Registry.register_dataset(_DATASET)(_calibration_batches)
    Registry.register_dataloader(_DATALOADER)(_prebatched)

    key = uuid.uuid4().hex
    _BATCHES[key] = batches
    records = _Records()
    saved_tempdir = tempfile.tempdir
    try:
        with tempfile.TemporaryDirectory(prefix="olive-") as tmp, \
                _environ(OLIVE_CACHE_DIR=str(Path(tmp) / "cache")), _quiet_and_restored(records):
            tmp = Path(tmp)
            try:
                output = olive_workflows.run(_olive_config(fp32_onnx, key, activations, tmp),
                                             tempdir=tmp / "tmp")
            except Exception as e:  # Olive raises what it takes for a user error (ValueError, TypeError...)
                raise RuntimeError(f"Olive {_PASS} failed: {type(e).__name__}: {e}") from e
            finally:
                tempfile.tempdir = saved_tempdir
            model = output.get_best_candidate() if output is not None and output.has_output_model() else None
            if model is None:
                raise records.failure(f"Olive {_PASS} produced no model")
            produced = Path(model.model_path)
            if produced.is_dir():
                produced = next(iter(sorted(produced.glob("*.onnx"))), produced)
            if not produced.is_file():
                raise records.failure(f"Olive {_PASS} reported {produced}, which is not a file")
            with atomic_path(out_path) as out:
                onnx.save(onnx.load(str(produced)), str(out))  # one self-contained file
    finally:
        _BATCHES.pop(key, None)
        tempfile.tempdir = saved_tempdir
    return Path(out_path)

