"""`distillery run ppcl` on a real DVC repo with tiny params: every PPCL stage runs on the default digits
teacher (a diffusers SD3Transformer2DModel), reports exist, a second run executes nothing; and on a user's
own transformers model in a folder outside the project, with its captured inputs, the menu's variants load
back with `from_pretrained` and a changed inputs file re-runs the chain."""
import sys
from pathlib import Path

import pytest
import torch
import yaml

from repos import tracked_in
from test_pipeline import dvc, make_project, set_params

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distillery" / "ppcl"))
import hf_tiny  # noqa: E402

pytestmark = pytest.mark.slow
PPCL = {
    "ppcl_teacher": {"depth": 5, "width": 0.5, "steps": 40, "prompts_per_digit": 2, "inputs_size": 128,
                     "heldout_size": 16},
    "probe": {"calibration_size": 32},
    "depth_distill": {"data_size": 64, "steps": 5, "batch_size": 16, "workers": 2},
    "width_prune": {"data_size": 64, "steps": 5, "ffn": 1, "text_mlp": 1},
    "menu": {"prompts_per_digit": 2, "sample_steps": 4, "warmup": 2, "runs": 20, "threads": [1]},
}
STAGES = ["prepare", "train", "ppcl_teacher", "probe", "intervals", "depth_distill", "width_prune", "menu"]
PPCL_STAGES = STAGES[2:]


@pytest.fixture(scope="module")
def project(tmp_path_factory, harness):
    root = make_project(tmp_path_factory.mktemp("ppcl") / "p")
    set_params(root, **PPCL)
    with tracked_in(root):
        yield root


def run(root):
    from flows.pipeline import pipeline
    return pipeline(recipe="ppcl", root=str(root))


def executed(outcome):
    return [s for s, o in outcome.items() if o == "executed"]


def menu_rows(root):
    import pandas as pd
    return pd.read_csv(root / "reports/ppcl_menu.csv")


def test_first_run_executes_every_ppcl_stage_and_writes_the_reports(project):
    from diffusers import SD3Transformer2DModel
    outcome = run(project)
    assert executed(outcome) == STAGES
    for path in ("models/ppcl/teacher/source.json", "models/ppcl/teacher/transformer/config.json", "models/ppcl/inputs.pt",
                 "models/ppcl/probes.pt", "models/ppcl/width/distillery_ppcl.json", "reports/ppcl_intervals.json",
                 "reports/ppcl_cka.png", "reports/ppcl_menu.md", "reports/ppcl_menu.png", "reports/ppcl/teacher/samples.png",
                 "reports/ppcl/teacher/inputs.md", "models/ppcl/onnx/teacher.onnx", "metrics/ppcl_probe.json"):
        assert (project / path).exists(), path
    assert list((project / "models/ppcl/students").glob("*_*.pt"))
    df = menu_rows(project)
    variants = list(df["variant"])
    assert variants[0] == "teacher" and len(variants) >= 5
    assert any(v.startswith("ablation") for v in variants) and any(v.endswith("_width") for v in variants)
    assert set(df["runtime"]) == {"onnxruntime"} and df["cosine"].between(-1, 1.0001).all()
    assert df["adherence_pct"].notna().all()
    for v in variants:
        assert (project / f"reports/ppcl/menu/{v}_samples.png").exists(), v
    depth = df[(df["variant"] != "teacher") & ~df["variant"].str.endswith("_width")].iloc[-1]
    reloaded = SD3Transformer2DModel.from_pretrained(project / "models/ppcl/variants" / depth["variant"])
    assert reloaded.config.num_layers == depth["blocks"] + 1  # the context_pre_only last block stays
    assert "up to date" in dvc(project, "status", "menu")
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(lock["menu"]["params"]["params.yaml"]) == {"menu"}
    assert set(lock["probe"]["params"]["params.yaml"]) == {"probe", "ppcl_teacher.device"}


def test_second_run_executes_nothing(project):
    lock = (project / "dvc.lock").read_text()
    assert executed(run(project)) == []
    assert (project / "dvc.lock").read_text() == lock


def capture_inputs(model, path, seed):
    from distillery.ppcl.capture import capture
    with capture(model) as rec, torch.no_grad():
        for i in range(4):
            model(**hf_tiny.inputs("llama", n=16, seed=seed + i))
    rec.save(path)


@pytest.fixture(scope="module")
def user_project(tmp_path_factory, harness):
    """A user's Llama in their own folder (not in the project) and their captured token ids."""
    home = tmp_path_factory.mktemp("user")
    model = hf_tiny.build("llama", layers=4)
    model.save_pretrained(home / "llama")
    capture_inputs(model, home / "inputs.pt", seed=0)
    root = make_project(tmp_path_factory.mktemp("ppcl_user") / "p")
    set_params(root, **PPCL)
    set_params(root, ppcl_teacher={"model": str(home / "llama"), "inputs": str(home / "inputs.pt"), "heldout_size": 16})
    with tracked_in(root):
        yield root, home


def test_a_users_llm_folder_runs_and_its_variants_load_with_from_pretrained(user_project):
    from transformers import AutoModelForCausalLM
    from flows.user_deps import sync
    from distillery.core.params import load_params
    root, home = user_project
    assert sync(root, load_params(root / "params.yaml"))  # params name the folder and the inputs: deps
    deps = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    assert {str(home / "llama"), str(home / "inputs.pt")} <= set(deps["ppcl_teacher"]["deps"])
    assert str(home / "llama") in deps["menu"]["deps"] and str(home / "inputs.pt") not in deps["menu"]["deps"]
    assert executed(run(root)) == STAGES
    df = menu_rows(root)
    for col in ("cosine", "relative_error", "perplexity", "perplexity_ratio", "next_token_agreement_pct", "speedup_1t"):
        assert df[col].notna().all(), col
    teacher = df[df["variant"] == "teacher"].iloc[0]
    assert teacher["perplexity_ratio"] == pytest.approx(1.0) and teacher["next_token_agreement_pct"] == 100
    half = df[df["variant"] == "ppcl50"].iloc[0]
    assert half["blocks"] == 2
    model = AutoModelForCausalLM.from_pretrained(root / "models/ppcl/variants/ppcl50")
    assert model.config.num_hidden_layers == 2 and type(model).__name__ == "LlamaForCausalLM"
    source = yaml.safe_load((root / "models/ppcl/teacher/source.json").read_text())
    assert source["kind"] == "folder" and "model.safetensors" in source["files"]
    # new captured inputs: the chain re-runs from ppcl_teacher, the classifier stages do not
    capture_inputs(AutoModelForCausalLM.from_pretrained(home / "llama"), home / "inputs.pt", seed=100)
    assert "inputs.pt" in dvc(root, "status", "ppcl_teacher")
    assert "up to date" in dvc(root, "status", "--with-deps", "train")
