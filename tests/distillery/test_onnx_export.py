import numpy as np
import pytest
import torch

from distillery.core.artifacts import load_checkpoint, save_checkpoint
from distillery.core.errors import ArtifactError
from distillery.latency import benchmark
from distillery.models import build_model
from distillery.onnx_export import export_fp32_onnx, load_session, onnx_stats, run_onnx


@pytest.fixture(scope="module")
def toy_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model({"arch": "toy", "in_channels": 1, "num_classes": 10}).eval()
    path = tmp_path_factory.mktemp("onnx") / "toy.onnx"
    export_fp32_onnx(model, (torch.randn(1, 1, 8, 8),), path)
    return model, path


def test_export_matches_torch_in_onnxruntime(toy_onnx):
    model, path = toy_onnx
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_onnx(path, x), expected, atol=1e-4, rtol=1e-4)


def test_stats_count_macs_and_parameters(toy_onnx):
    _, path = toy_onnx
    stats = onnx_stats(path)
    # toy: conv 1->16 3x3 on 8x8, conv 16->32 3x3 stride 2 -> 4x4, fc 32->10
    assert stats["macs"] == 16 * 8 * 8 * 9 + 32 * 4 * 4 * 16 * 9 + 32 * 10
    assert stats["params"] >= 16 * 9 + 32 * 16 * 9 + 32 * 10 + 10
    assert stats["nonzero_params"] <= stats["params"] and stats["size_bytes"] == path.stat().st_size


def test_benchmark_reports_percentiles_and_ratio_to_baseline(toy_onnx):
    _, path = toy_onnx
    x = np.zeros((1, 1, 8, 8), np.float32)
    result = benchmark({"base": path, "same": path}, "base", x, threads=[1], warmup=2, runs=20)
    base = result["models"]["base"]["threads_1"]
    assert base["speedup_p50"] == 1.0 and base["p50_ms"] <= base["p90_ms"] <= base["p99_ms"]
    assert 0.3 < result["models"]["same"]["threads_1"]["speedup_p50"] < 3
    assert {"cpu_model", "avx512_vnni", "amx_int8", "onnxruntime_version"} <= set(result["cpu"])


def test_truncated_onnx_is_a_clear_error_naming_the_file(toy_onnx, tmp_path):
    _, path = toy_onnx
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="cut.onnx"):
        load_session(cut)


def test_truncated_checkpoint_is_a_clear_error_naming_the_file(tmp_path):
    model = build_model({"arch": "toy"})
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, {"arch": "toy"})
    assert set(load_checkpoint(path)) == {"spec", "state_dict"}
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="m.pt.*truncated or corrupt"):
        load_checkpoint(path)


def test_the_export_takes_any_batch(toy_onnx):
    _, path = toy_onnx
    assert not isinstance(load_session(path, 1).get_inputs()[0].shape[0], int)  # a symbolic "batch"
    assert onnx_stats(path)["macs"] > 0  # counted at batch 1


class FixedBatch(torch.nn.Module):
    """A user's model whose code fixes its batch: `view(1, -1)`."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.conv(x).view(1, -1))


def test_a_model_that_fixes_its_batch_still_exports_with_that_batch_and_says_so(tmp_path, capsys):
    torch.manual_seed(0)
    path = export_fp32_onnx(FixedBatch().eval(), (torch.randn(1, 1, 8, 8),), tmp_path / "fixed.onnx")
    assert load_session(path, 1).get_inputs()[0].shape[0] == 1
    assert "takes batches of 1 only" in capsys.readouterr().out
