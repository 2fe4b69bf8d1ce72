"""Where the time goes: ORT's profiler summed per operator kind, and the CPU's INT8 peak arithmetic."""
import numpy as np
import pytest
import torch

from distillery.compress.ptq import quantize_ptq
from distillery.models import build_model
from distillery.onnx_export import export_fp32_onnx
from distillery.profiling import int8_peak_ops, kind, kind_shares, op_profile, time_breakdown


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model({"arch": "toy", "in_channels": 1}).eval()
    tmp = tmp_path_factory.mktemp("prof")
    fp32 = export_fp32_onnx(model, (torch.rand(1, 1, 8, 8),), tmp / "toy.fp32.onnx")
    calib = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    return fp32, quantize_ptq(fp32, tmp / "toy.int8.onnx", calib)


def test_profile_sums_kernel_time_per_operator_kind(models):
    fp32, int8 = models
    x = np.random.default_rng(1).random((1, 1, 8, 8), dtype=np.float32)
    for path, main in ((fp32, "fp32"), (int8, "int8")):
        rows = op_profile(path, x, threads=1, warmup=2, runs=5)
        shares = kind_shares(rows)
        assert sum(shares.values()) == pytest.approx(1.0)
        assert all(r["us_per_run"] > 0 and r["calls_per_run"] > 0 for r in rows)
        assert max(shares, key=shares.get) == main, (path, shares)
    assert [kind(op) for op in ("QLinearConv", "DequantizeLinear", "ReorderInput", "Conv")] == \
        ["int8", "quant", "layout", "fp32"]


def test_int8_peak_from_flags_and_clock():
    vnni = int8_peak_ops({"avx512_vnni": True, "amx_int8": True}, cores=2, ghz=2.0)
    assert vnni["vnni_ops"] == 256 * 2 * 2e9 and vnni["amx_ops"] == 2048 * 2 * 2e9
    assert int8_peak_ops({"avx2": True}, cores=1, ghz=1.0)["vnni_ops"] == 128e9
    assert int8_peak_ops({}, cores=1, ghz=None)["vnni_ops"] is None


def test_time_breakdown_puts_the_int8_rate_against_the_peak(models):
    fp32, int8 = models
    x = np.random.default_rng(1).random((1, 1, 8, 8), dtype=np.float32)
    peak = int8_peak_ops({"avx512_vnni": True}, cores=1, ghz=2.0)
    q = time_breakdown(int8, x, threads=1, runs=5, peak=peak)
    assert q["int8_macs_pct"] == pytest.approx(100.0)
    assert q["int8_pct"] + q["fp32_pct"] + q["quant_dequant_pct"] + q["layout_pct"] == pytest.approx(100.0)
    assert q["int8_gops"] > 0 and q["pct_of_vnni_peak"] == pytest.approx(100 * q["int8_gops"] * 1e9 / peak["vnni_ops"])
    assert q["top_ops"] and q["kernel_us"] > 0
    f = time_breakdown(fp32, x, threads=1, runs=5, peak=peak)
    assert f["int8_pct"] == 0 and f["int8_gops"] is None and f["int8_macs_pct"] == 0
