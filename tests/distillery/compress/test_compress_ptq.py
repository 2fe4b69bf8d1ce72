"""ORT's static quantization as baselines: the tuned per-channel UINT8 form and its plain defaults."""
import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from distillery.compress import ptq
from distillery.compress.qat import int8_initializers
from distillery.models import build_model
from distillery.onnx_export import export_fp32_onnx, run_onnx


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model({"arch": "toy", "in_channels": 1}).train()
    with torch.no_grad():
        model(torch.rand(64, 1, 8, 8))  # non-trivial BN statistics
    path = tmp_path_factory.mktemp("ptq") / "toy.fp32.onnx"
    return export_fp32_onnx(model.eval(), (torch.rand(1, 1, 8, 8),), path)


def _zero_point_types(path) -> set[str]:
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    return {onnx.TensorProto.DataType.Name(inits[n.input[2]].data_type)
            for n in graph.node if n.op_type == "QuantizeLinear"}


def _optimized_ops(path, tmp_path) -> collections.Counter:
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)


def test_quantize_ptq_is_per_channel_int8_weights_uint8_activations(fp32, tmp_path):
    calib = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    out = ptq.quantize_ptq(fp32, tmp_path / "ptq.onnx", calib)
    assert _zero_point_types(out) == {"UINT8"}
    graph = onnx.load(str(out)).graph
    inits = {i.name: i for i in graph.initializer}
    weights = int8_initializers(out)
    assert len(weights) == 3  # two convs and the classifier
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in weights and len(inits[n.input[0]].dims) == 4:
            assert numpy_helper.to_array(inits[n.input[1]]).shape == (inits[n.input[0]].dims[0],)
    ops = _optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0
    x = np.random.default_rng(1).random((64, 1, 8, 8), dtype=np.float32)
    ref, got = run_onnx(fp32, x), run_onnx(out, x)
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_quantize_ort_defaults_uses_int8_activations(fp32, tmp_path):
    calib = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)
    out = ptq.quantize_ort_defaults(fp32, tmp_path / "defaults.onnx", calib)
    assert _zero_point_types(out) == {"INT8"}
    assert int8_initializers(out)


def test_too_few_calibration_samples_is_an_error(fp32, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        ptq.quantize_ptq(fp32, tmp_path / "x.onnx", np.zeros((0, 1, 8, 8), np.float32))


def test_ort_s8s8_and_nncf_peers_quantize_with_int8_activations_and_keep_the_outputs(fp32, tmp_path):
    """The peers a user would pick: ORT's S8S8 form (INT8 activations after pre-processing) and NNCF's
    `nncf.quantize` (its own activation types); both hold INT8 weights and stay close to the FP32 model."""
    rng = np.random.default_rng(0)
    calib = rng.random((32, 1, 8, 8), dtype=np.float32)
    x = calib[:1]
    want = run_onnx(fp32, x)
    for name, make in (("s8s8", lambda p: ptq.quantize_ptq(fp32, p, calib, activations="s8")),
                       ("nncf", lambda p: ptq.quantize_nncf(fp32, p, calib))):
        out = make(tmp_path / f"{name}.onnx")
        if name == "s8s8":
            assert _zero_point_types(out) == {"INT8"}
        assert int8_initializers(out), name
        got = run_onnx(out, x)
        assert np.abs(got - want).max() < 0.25 * np.abs(want).max() + 1e-3, name
    with pytest.raises(ValueError, match="u8 or s8"):
        ptq.quantize_ptq(fp32, tmp_path / "bad.onnx", calib, activations="fp8")
