"""Olive's static quantization as a PTQ peer: real Olive, real ONNX Runtime, on the toy conv model."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from distillery.compress import olive_ptq
from distillery.compress.qat import int8_initializers
from distillery.models import build_model
from distillery.onnx_export import export_fp32_onnx, run_onnx


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model({"arch": "toy", "in_channels": 1}).train()
    with torch.no_grad():
        model(torch.rand(64, 1, 8, 8))  # non-trivial BN statistics
    path = tmp_path_factory.mktemp("olive") / "toy.fp32.onnx"
    return export_fp32_onnx(model.eval(), (torch.rand(1, 1, 8, 8),), path)


@pytest.fixture
def calib():
    return np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)


def _zero_point_types(path) -> set[str]:
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    return {onnx.TensorProto.DataType.Name(inits[n.input[2]].data_type)
            for n in graph.node if n.op_type == "QuantizeLinear"}


def test_olive_quantizes_per_channel_int8_weights_uint8_activations_and_keeps_top1(fp32, calib, tmp_path):
    out = olive_ptq.quantize_olive(fp32, tmp_path / "olive.onnx", calib)
    assert out == tmp_path / "olive.onnx" and sorted(p.name for p in tmp_path.iterdir()) == ["olive.onnx"]
    assert _zero_point_types(out) == {"UINT8"}
    graph = onnx.load(str(out)).graph
    inits = {i.name: i for i in graph.initializer}
    weights = int8_initializers(out)
    assert len(weights) == 3  # two convs and the classifier
    for n in graph.node:  # one scale per output channel
        if n.op_type == "DequantizeLinear" and n.input[0] in weights:
            assert numpy_helper.to_array(inits[n.input[1]]).shape == (inits[n.input[0]].dims[0],)
    x = np.random.default_rng(1).random((64, 1, 8, 8), dtype=np.float32)
    ref, got = run_onnx(fp32, x), run_onnx(out, x)
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.9
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_olive_int8_activations(fp32, calib, tmp_path):
    out = olive_ptq.quantize_olive(fp32, tmp_path / "s8.onnx", calib, activations="s8")
    assert _zero_point_types(out) == {"INT8"}
    assert len(int8_initializers(out)) == 3
    with pytest.raises(ValueError, match="u8 or s8"):
        olive_ptq.quantize_olive(fp32, tmp_path / "bad.onnx", calib, activations="fp8")


def test_olive_writes_nothing_outside_its_temporary_directory(fp32, calib, tmp_path, monkeypatch):
    """Not the current directory, not the system temp dir (Olive's own temp dirs lie in ours), and the
    process state Olive changes (tempfile.tempdir, OLIVE_CACHE_DIR, the olive logger) is put back."""
    cwd, systmp = tmp_path / "cwd", tmp_path / "systmp"
    cwd.mkdir(), systmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    monkeypatch.delenv("OLIVE_CACHE_DIR", raising=False)
    olive_logger = logging.getLogger("olive")
    before = (olive_logger.level, olive_logger.handlers[:])
    olive_ptq.quantize_olive(fp32, tmp_path / "out" / "olive.onnx", calib)
    assert list(cwd.iterdir()) == [] and list(systmp.iterdir()) == []
    assert tempfile.tempdir == str(systmp) and "OLIVE_CACHE_DIR" not in os.environ
    assert (olive_logger.level, olive_logger.handlers) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["olive.onnx"]


def test_bad_inputs_raise_clear_errors_and_leave_no_output(fp32, calib, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such ONNX model"):
        olive_ptq.quantize_olive(tmp_path / "missing.onnx", tmp_path / "a.onnx", calib)
    with pytest.raises(ValueError, match="calibration"):
        olive_ptq.quantize_olive(fp32, tmp_path / "b.onnx", calib[:0])
    # Olive's own failure (ORT rejects the calibration batches): its reason, no model
    with pytest.raises(RuntimeError, match="produced no model.*invalid dimensions"):
        olive_ptq.quantize_olive(fp32, tmp_path / "c.onnx", np.zeros((4, 1, 9, 9), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_olive_sends_no_telemetry(fp32, calib, tmp_path):
    """In a fresh process, as on a user's machine (no CI variable): nothing is handed to Olive's HTTP
    transport and no telemetry cache is written. OLIVE_DISABLE_TELEMETRY alone would not do it (module doc)."""
    script = textwrap.dedent(f"""
        import json, numpy as np, requests
        sent = []
        def refuse(self, request, *args, **kwargs):
            sent.append(request.url)
            raise requests.exceptions.ConnectionError("offline test")
        requests.adapters.HTTPAdapter.send = refuse
        from distillery.compress import olive_ptq
        olive_ptq.quantize_olive({str(fp32)!r}, {str(tmp_path / "q.onnx")!r},
                                 np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32))
        from olive.telemetry import Telemetry
        Telemetry().shutdown()  # flushes whatever was queued
        print(json.dumps(sent))
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("CI", "TF_BUILD", "GITHUB_ACTIONS", "JENKINS_URL", "CODEBUILD_BUILD_ID", "BUILDKITE",
                        "SYSTEM_TEAMFOUNDATIONCOLLECTIONURI", "OLIVE_DISABLE_TELEMETRY")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # where Olive's telemetry keeps its device id and retry cache
    done = subprocess.run([sys.executable, "-c", script], check=False, env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert not (tmp_path / "cache" / "Microsoft" / "DeveloperTools" / ".onnxruntime" / "cache").exists()
    assert (tmp_path / "q.onnx").is_file()
