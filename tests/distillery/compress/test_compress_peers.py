"""The post-training peers run through one door: a model ORT runs, or a record of why not, never a crash."""
import numpy as np
import pytest
import torch

from distillery.compress import peers
from distillery.core.errors import ParamsError
from distillery.core.params import PEERS, parse_section
from distillery.models import build_model
from distillery.onnx_export import export_fp32_onnx, run_onnx


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model({"arch": "toy", "in_channels": 1}).eval()
    path = tmp_path_factory.mktemp("peers") / "toy.fp32.onnx"
    return export_fp32_onnx(model, (torch.rand(1, 1, 8, 8),), path)


CALIB = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)


def test_the_params_schema_names_exactly_the_peers_the_library_runs():
    assert tuple(peers.PEERS) == PEERS
    with pytest.raises(ParamsError, match="unknown peer 'ncf'.*did you mean 'nncf'"):
        parse_section("baselines", {"peers": {"ncf": True}})


def test_a_peer_that_works_gives_an_int8_model_ort_runs_at_any_batch(fp32, tmp_path):
    out = tmp_path / "u8s8.int8.onnx"
    record = peers.run_peer("ort_u8s8", fp32, out, CALIB)
    assert record["status"] == "ok" and record["int8_weight_initializers"] == 3, record
    assert record["package"] == "onnxruntime" and record["version"][0].isdigit()
    assert run_onnx(out, CALIB).shape == (16, 10)  # the teacher's symbolic batch survives quantization


def test_a_peer_that_fails_is_a_record_saying_why_and_leaves_no_file(fp32, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(fp32.read_bytes()[:200])  # a truncated model: every tool fails on it
    out = tmp_path / "nncf.int8.onnx"
    record = peers.run_peer("ort_u8s8", broken, out, CALIB)
    assert record["status"] == "failed" and record["error"] and record["seconds"] >= 0, record
    assert not out.exists()


def test_a_peer_whose_model_ort_cannot_run_is_a_failure_too(fp32, tmp_path):
    def writes_garbage(src, out, calib_x):
        out.write_bytes(b"not an onnx model")
        return out
    table = {"garbage": peers.Peer("writes garbage", "numpy", writes_garbage)}
    record = peers.run_peer("garbage", fp32, tmp_path / "g.onnx", CALIB, peers=table)
    assert record["status"] == "failed" and "not a loadable ONNX model" in record["error"]
    assert not (tmp_path / "g.onnx").exists()
