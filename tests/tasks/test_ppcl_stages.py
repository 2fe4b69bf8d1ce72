"""The PPCL stages' own logic on tiny configs: data, classifier preprocessing, interval choice, and a
menu variant assembled from students trained in separate calls, without any training."""
import json

import numpy as np
import pytest
import torch

from pathlib import Path

import yaml

from distillery.core.params import load_params, parse_section
from distillery.core.errors import ParamsError
from distillery.models import build_model
from distillery.ppcl.adapter import MMDIT, trace
from distillery.ppcl.hf import adapter_for
from distillery.ppcl.depth import DistillConfig, distill_interval
from distillery.ppcl.flow_matching import noisy_inputs

ROOT = Path(__file__).resolve().parents[2]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
SPEC = {"arch": "mmdit", "width": 0.5, "depth": 4, "in_channels": 1, "image_size": 8}


def tiny_teacher(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(SPEC)
    with torch.no_grad():  # adaLN-zero blocks start as the identity: give them something to do
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_trace(model, n: int = 32):
    x = torch.rand(n, 1, 8, 8) * 2 - 1
    y = torch.arange(n) % 10
    return trace(model, MMDIT, noisy_inputs(x, y, n, seed=0))


def write_prepared(root, size: int = 16):
    from distillery.core.artifacts import write_npz
    prepared = root / "data/prepared"
    prepared.mkdir(parents=True)
    rng = np.random.default_rng(0)
    raw = rng.random((20, 1, size, size), dtype=np.float32)
    mean, std = float(raw.mean()), float(raw.std())
    for split in ("train", "val"):
        write_npz(prepared / f"{split}.npz", x=(raw - mean) / std, y=np.arange(20) % 10)
    (prepared / "meta.json").write_text(json.dumps({"image_size": size, "in_channels": 1, "mean": [mean],
                                                    "std": [std], "num_classes": 10}))
    return raw


def test_default_params_validate_and_ablation_ratio_must_be_a_variant():
    configs = load_params(ROOT / "params.yaml")
    assert configs["ppcl_teacher"].steps >= 1500 and configs["ppcl_teacher"].depth >= 12
    assert configs["intervals"].ablation_ratio in configs["intervals"].ratios
    with pytest.raises(ParamsError, match="ablation_ratio"):
        parse_section("intervals", {**PARAMS["intervals"], "ratios": [0.25], "ablation_ratio": 0.5})
    with pytest.raises(ParamsError, match="unknown key"):
        parse_section("menu", {**PARAMS["menu"], "thread": [1]})


def test_diffusion_data_undoes_standardisation_and_resizes_to_8x8(tmp_path, monkeypatch):
    from distillery.ppcl import digits
    raw = write_prepared(tmp_path)
    x, y = digits.diffusion_data(tmp_path / "data/prepared", 8)
    assert x.shape == (40, 1, 8, 8) and len(y) == 40
    assert x.min() >= -1 and x.max() <= 1
    expected = digits.resize(torch.from_numpy(raw), 8) * 2 - 1
    assert torch.allclose(x[:20], expected.clamp(-1, 1), atol=1e-5)


def test_classifier_preprocess_maps_samples_to_the_classifiers_input(tmp_path, monkeypatch):
    from distillery.ppcl import digits
    write_prepared(tmp_path, size=16)
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return torch.zeros(len(x), 10)

    m = digits.meta(tmp_path / "data/prepared")
    clf = digits.Classifier(Probe(), m)
    clf(torch.full((3, 1, 8, 8), -1.0))
    assert seen["x"].shape == (3, 1, 16, 16)
    assert torch.allclose(seen["x"], torch.full_like(seen["x"], (0 - m["mean"][0]) / m["std"][0]), atol=1e-5)


def test_intervals_choice_has_every_selection_and_a_matched_ablation():
    from types import SimpleNamespace

    from distillery.ppcl.selection import choose
    from distillery.ppcl.cka import cka_table
    from distillery.ppcl.probes import fit_probes
    teacher = tiny_teacher()
    tr = tiny_trace(teacher)
    probes, _ = fit_probes(tr, MMDIT)
    table = cka_table(teacher, MMDIT, probes, tr)
    cfg = SimpleNamespace(ratios=[0.25, 0.5], min_len=2, max_len=4, cka_threshold=0.0, ablation_ratio=0.5)
    chosen = choose(table, tr, MMDIT, cfg)
    assert set(chosen["selected"]) == {"0.25", "0.5"} and chosen["variants"] == {"ppcl25": "0.25", "ppcl50": "0.5"}
    assert chosen["removed"]["0.25"] == 1 and chosen["removed"]["0.5"] == 2
    assert chosen["ablation"]["removed"] == chosen["ablation"]["target_removed"] == 2
    needed = {tuple(iv) for s in chosen["selected"].values() for iv in s}
    assert {tuple(iv) for iv in chosen["students"]} == needed
    for key in ("table", "delta", "intervals", "candidates", "baselines"):
        assert key in chosen
    assert len(chosen["baselines"]["block_influence"]) == 4
    json.dumps(chosen)  # NaNs cleaned: plain JSON


def test_variant_assembles_from_students_trained_in_separate_calls_without_training(tmp_path, monkeypatch):
    """Two students, each from its own distill call and saved to its own file, plug into the teacher
    together: no optimizer step, weights exactly as saved, two blocks fewer."""
    from distillery.ppcl.students import save_student
    from tasks.menu import assemble_menu
    from tasks.paths import STUDENTS
    teacher = tiny_teacher()
    tr = tiny_trace(teacher)
    cfg = DistillConfig(steps=3, batch_size=8)
    monkeypatch.chdir(tmp_path)
    saved = {}
    for iv in [(0, 2), (2, 4)]:  # separate calls: neither student ever saw the other
        student, hist = distill_interval(teacher, MMDIT, tr, iv, cfg)
        saved[iv] = {k: v.clone() for k, v in student.state_dict().items()}
        save_student(STUDENTS / f"{iv[0]}_{iv[1]}.pt", student.state_dict(), iv, hist.initial, hist.final,
                           "independent")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    chosen = {"variants": {"ppcl50": "0.5", "ppcl25": "0.25"}, "selected": {"0.5": [[0, 2], [2, 4]], "0.25": [[2, 4]]},
              "ablation": {"intervals": [], "ratio": 0.5, "selector": "none"}}

    def no_training(*args, **kwargs):
        raise AssertionError("an optimizer step while assembling a variant")

    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", no_training)
    monkeypatch.setattr(torch.optim.AdamW, "step", no_training)
    monkeypatch.setattr(torch.optim.Adam, "step", no_training)
    menu = assemble_menu(teacher, MMDIT, chosen, width_path=None)
    assert [menu[n]["blocks"] for n in ("teacher", "ppcl25", "ppcl50")] == [4, 3, 2]
    variant = menu["ppcl50"]["model"]
    for i, iv in enumerate([(0, 2), (2, 4)]):
        for k, v in variant.blocks[i].state_dict().items():
            assert torch.equal(v, saved[iv][k]), (iv, k)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    x, t, tokens = teacher.example_inputs(2)
    with torch.no_grad():
        assert variant(x, t, tokens).shape == x.shape


def test_distill_worker_runs_one_interval_from_only_its_states(tmp_path):
    """A worker loads the teacher from its folder (source.json, as a later stage does) and trains from the
    states the job carries."""
    from distillery.ppcl.hf import adapter_for
    from distillery.ppcl.capture import split_call
    from distillery.ppcl.digits_hf import build_digits_denoiser
    from distillery.ppcl.source import write_source
    from distillery.ppcl.students import jobs, run_jobs
    denoiser = build_digits_denoiser(width=0.5, depth=5, seed=0)
    denoiser.transformer.save_pretrained(tmp_path / "teacher/transformer")
    write_source(tmp_path / "teacher", {"kind": "digits", "path": str(tmp_path / "teacher"), "subfolder": "transformer"})
    model = denoiser.transformer.eval()
    adapter = adapter_for(model)
    x, t, tokens = denoiser.example_inputs(16)
    tr = trace(model, adapter, split_call(denoiser.model_inputs(x, t, tokens)))
    all_jobs = jobs(tmp_path / "teacher", tr, [(0, 2)], [(1, 3)], DistillConfig(steps=2, batch_size=8))
    assert set(all_jobs[0]["states"]) == {0, 2}
    results = run_jobs(all_jobs, workers=1)
    assert [r["kind"] for r in results] == ["interval", "sequential"]
    assert set(results[0]["results"]) == {(0, 2)} and set(results[1]["results"]) == {(1, 3)}
    state = results[0]["results"][(0, 2)][0]
    assert set(state) == set(adapter.blocks(model)[0].state_dict())


def test_menu_times_in_pytorch_when_a_class_does_not_export_to_onnx(tmp_path, monkeypatch):
    """Qwen-Image's complex rotary embedding does not export: every variant is timed in PyTorch instead (like
    with like), and the report says why; a class that exports is timed in ONNX Runtime."""
    import sys
    from types import SimpleNamespace
    from distillery.ppcl.capture import split_call
    from distillery.ppcl.depth import assemble
    from tasks.menu import timing
    sys.path.insert(0, str(ROOT / "tests/distillery/ppcl"))
    import hf_tiny
    monkeypatch.chdir(tmp_path)
    cfg = SimpleNamespace(opset=18, threads=[1], warmup=1, runs=10)
    for kind, runtime in (("qwen_image", "pytorch"), ("llama", "onnxruntime")):
        model = hf_tiny.build(kind)
        adapter = adapter_for(model)
        menu = {"teacher": {"model": model}, "half": {"model": assemble(model, adapter, {(0, 2): None})}}
        res, got, failure = timing(menu, split_call(hf_tiny.inputs(kind, n=1)), cfg)
        assert got == runtime, failure
        assert (failure is None) == (runtime == "onnxruntime")
        assert set(res["models"]) == {"teacher", "half"} and res["models"]["half"]["threads_1"]["p50_ms"] > 0
        assert sorted(p.stem for p in (tmp_path / "models/ppcl/onnx").glob("*.onnx")) == \
            ([] if runtime == "pytorch" else ["half", "teacher"])
