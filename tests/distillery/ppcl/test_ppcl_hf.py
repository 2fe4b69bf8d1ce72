"""PPCL on the libraries' own classes (tiny random configs saved as the libraries save them): the adapters
reproduce each model's forward, the whole chain runs, pruned variants load back with the library's own
`from_pretrained`, and students trained once plug into subsets no training saw."""
import json

import pytest
import torch

import hf_tiny
from distillery.core.errors import DataError, ParamsError
from distillery.ppcl.adapter import trace
from distillery.ppcl.hf import adapter_for
from distillery.ppcl.capture import ModelInputs, capture, read_inputs_file, split_call
from distillery.ppcl.cka import cka_table
from distillery.ppcl.depth import DistillConfig, assemble, distill_interval
from distillery.ppcl.fidelity import output_fidelity
from distillery.ppcl.hf import check_folder, forward_output, load_pretrained, save_variant
from distillery.ppcl.probes import fit_probes
from distillery.ppcl.width import WidthConfig, linearize_mlps, lowest_error_targets, mlp_linear_errors


@pytest.mark.parametrize("kind", hf_tiny.CLASSES)
def test_adapter_reproduces_the_models_own_forward(kind):
    model = hf_tiny.build(kind)
    kwargs = hf_tiny.inputs(kind, n=6)
    with torch.no_grad():
        want = forward_output(model, kwargs)
    got = trace(model, adapter_for(model), split_call(kwargs), batch_size=4).output  # two chunks
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


@pytest.mark.parametrize("kind", hf_tiny.CLASSES)
def test_chain_runs_and_variants_reload_with_the_librarys_from_pretrained(kind, tmp_path):
    teacher = hf_tiny.save(hf_tiny.build(kind), tmp_path / "teacher")
    model = load_pretrained(teacher)
    adapter = adapter_for(model)
    n = len(adapter.blocks(model))
    inputs = split_call(hf_tiny.inputs(kind, n=16))
    tr = trace(model, adapter, inputs)
    probes, errors = fit_probes(tr, adapter)
    table = cka_table(model, adapter, probes, tr)
    assert errors.shape == (n, len(adapter.streams)) and table.shape == (n + 1, n + 1)
    student, _ = distill_interval(model, adapter, tr, (1, 3), DistillConfig(steps=3, batch_size=8))
    variant = assemble(model, adapter, {(1, 3): student})
    folder = save_variant(variant, tmp_path / "variant")
    # the stock class, as a user of the library loads it
    cls = type(model)
    if kind in hf_tiny.LLMS:
        from transformers import AutoModelForCausalLM
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
        assert reloaded.config.num_hidden_layers == n - 1
        assert [layer.self_attn.layer_idx for layer in reloaded.model.layers] == list(range(n - 1))
    else:
        reloaded = cls.from_pretrained(folder)
    assert type(reloaded) is cls and len(adapter.blocks(reloaded)) == n - 1
    small = split_call(hf_tiny.inputs(kind, n=3, seed=1))
    with torch.no_grad():
        want = trace(variant, adapter, small).output
        assert torch.allclose(forward_output(reloaded.eval(), small.kwargs()), want, atol=1e-5)
    # width: linear projectors in place of MLPs, loaded back with their module
    vtr = trace(variant, adapter, inputs)
    targets = lowest_error_targets(mlp_linear_errors(variant, adapter, vtr), 1)
    wide, report = linearize_mlps(variant, adapter, vtr, targets, WidthConfig(steps=2, batch_size=8))
    assert len(report) == 1 and report[0]["error_trained"] >= 0
    wfolder = save_variant(wide, tmp_path / "width")
    assert json.loads((wfolder / "distillery_ppcl.json").read_text())["linear_mlps"]
    with torch.no_grad():
        assert torch.allclose(trace(load_pretrained(wfolder), adapter, small).output,
                              trace(wide, adapter, small).output, atol=1e-5)
    assert (wide is not variant) and sum(p.numel() for p in wide.parameters()) < sum(p.numel() for p in variant.parameters())


@pytest.mark.parametrize("kind", ["sd3", "llama"])
def test_students_trained_once_plug_into_a_subset_no_training_saw(kind):
    model = hf_tiny.build(kind, layers=5 if kind == "sd3" else 4)
    adapter = adapter_for(model)
    inputs = split_call(hf_tiny.inputs(kind, n=64))
    tr = trace(model, adapter, inputs)
    cfg = DistillConfig(steps=60, lr=3e-3, batch_size=32)
    first, h1 = distill_interval(model, adapter, tr, (0, 2), cfg)
    second, h2 = distill_interval(model, adapter, tr, (2, 4), cfg)
    assert h1.final < h1.initial and h2.final < h2.initial
    before = {k: v.clone() for k, v in second.state_dict().items()}
    alone = assemble(model, adapter, {(2, 4): second})  # never trained in this company
    both = assemble(model, adapter, {(0, 2): first, (2, 4): second})
    dropped = assemble(model, adapter, {(2, 4): None})
    held = split_call(hf_tiny.inputs(kind, n=16, seed=3))
    with torch.no_grad():
        ref = trace(model, adapter, held).output
        fid = {name: output_fidelity(ref, trace(m, adapter, held).output)
               for name, m in (("alone", alone), ("both", both), ("dropped", dropped))}
    assert all(torch.equal(before[k], v) for k, v in second.state_dict().items())  # plugging trains nothing
    assert len(adapter.blocks(alone)) == len(adapter.blocks(model)) - 1
    assert len(adapter.blocks(both)) == len(adapter.blocks(model)) - 2
    assert fid["alone"]["relative_error"] < fid["dropped"]["relative_error"]


def test_capture_records_a_callers_forward_calls_and_splits_static_inputs(tmp_path):
    model = hf_tiny.build("flux")
    kwargs = hf_tiny.inputs("flux", n=3)
    with capture(model) as rec:
        with torch.no_grad():
            for seed in range(2):
                call = hf_tiny.inputs("flux", n=3, seed=seed)
                model(call["hidden_states"], encoder_hidden_states=call["encoder_hidden_states"],
                      pooled_projections=call["pooled_projections"], timestep=call["timestep"],
                      img_ids=call["img_ids"], txt_ids=call["txt_ids"], return_dict=False)
    path = rec.save(tmp_path / "inputs.pt")
    got = read_inputs_file(path)
    assert len(got) == 6 and set(got.static) == {"img_ids", "txt_ids"}
    assert torch.equal(got.batched["hidden_states"][:3], kwargs["hidden_states"])
    assert "return_dict" not in got.batched and "return_dict" not in got.static
    with torch.no_grad():  # the captured inputs drive the model exactly as the caller did
        assert torch.allclose(forward_output(model, got.take(slice(0, 3)).kwargs()),
                              forward_output(model, kwargs), atol=1e-6)


def test_inputs_of_different_shapes_and_unsupported_folders_are_refused(tmp_path):
    a = split_call({"input_ids": torch.zeros(2, 8, dtype=torch.long)})
    b = split_call({"input_ids": torch.zeros(2, 9, dtype=torch.long)})
    with pytest.raises(DataError, match="different shapes"):
        ModelInputs.cat([a, b])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                           "_diffusers_version": "0.42.1"}))
    with pytest.raises(ParamsError, match="no PPCL adapter.*supported"):
        check_folder(tmp_path / "bad")
    with pytest.raises(ParamsError, match="subfolder"):
        check_folder(tmp_path / "missing")
    assert check_folder(hf_tiny.save(hf_tiny.build("llama", layers=2), tmp_path / "lm")) == "LlamaForCausalLM"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_device_auto_is_the_cpu_without_a_gpu_and_cuda_is_a_clear_error():
    from distillery.ppcl.hf import resolve_device
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ParamsError, match="no GPU.*device: auto or cpu"):
        resolve_device("cuda")


def test_inputs_from_a_users_function_and_its_errors(tmp_path, monkeypatch):
    from distillery.ppcl.capture import load_inputs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_inputs.py").write_text(
        "import torch\n"
        "def calibration():\n"
        "    for i in range(3):\n"
        "        yield {'input_ids': torch.full((4, 8), i), 'attention_mask': torch.ones(4, 8, dtype=torch.long)}\n"
        "def broken():\n"
        "    return [1, 2]\n")
    got = load_inputs("my_inputs.py:calibration")
    assert len(got) == 12 and set(got.batched) == {"input_ids", "attention_mask"}
    assert got.batched["input_ids"][8:].eq(2).all()
    with pytest.raises(DataError, match="must return or yield dicts"):
        load_inputs("my_inputs.py:broken")
    with pytest.raises(ParamsError, match="ppcl_teacher.inputs.*no 'calibraton'.*did you mean calibration"):
        load_inputs("my_inputs.py:calibraton")


@pytest.mark.parametrize("kind", hf_tiny.LLMS)
def test_padded_llm_inputs_reproduce_the_forward_across_chunks(kind):
    """A padding mask in some batches only, position ids given per call: every chunk of the trace gets the
    same kind of condition, and the adapter still matches the model (padding positions aside)."""
    model = hf_tiny.build(kind)
    calls = []
    for i in range(3):
        kw = hf_tiny.inputs(kind, n=4, seed=i)
        kw["attention_mask"] = torch.ones_like(kw["input_ids"])
        if i == 2:
            kw["attention_mask"][:2, :3] = 0  # left padding in the last call only
        kw["position_ids"] = torch.arange(12)[None]  # one row for the whole batch
        calls.append(kw)
    inputs = ModelInputs.cat([split_call(c) for c in calls])
    assert inputs.batched["position_ids"].shape == (12, 12)
    got = trace(model, adapter_for(model), inputs, batch_size=4).output
    with torch.no_grad():
        want = torch.cat([forward_output(model, c) for c in calls])
    real = torch.cat([c["attention_mask"] for c in calls]).bool()
    assert torch.allclose(got[real], want[real], atol=1e-5)


def test_captured_half_precision_and_batch_wide_values_become_float32_per_sample_inputs():
    model = hf_tiny.build("qwen_image")
    kw = hf_tiny.inputs("qwen_image", n=4)
    call = {**kw, "hidden_states": kw["hidden_states"].half(), "timestep": kw["timestep"][:1]}  # one timestep
    del call["encoder_hidden_states_mask"]  # the pipeline drops an all-ones mask...
    got = ModelInputs.cat([split_call(call), split_call(kw)])  # ... another call passes it
    assert got.batched["hidden_states"].dtype == torch.float32
    assert got.batched["timestep"].shape == (8,) and torch.equal(got.batched["timestep"][:4],
                                                                  kw["timestep"][:1].expand(4))
    assert got.batched["encoder_hidden_states_mask"][:4].eq(1).all()
    with torch.no_grad():
        out = forward_output(model, got.take(slice(0, 4)).kwargs())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
