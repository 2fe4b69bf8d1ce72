"""`distillery run ppcl` on a real DVC repo with tiny params: every PPCL stage runs, reports exist,
and a second run executes nothing."""
import pytest
import yaml

from repos import tracked_in
from test_pipeline import dvc, make_project, set_params

pytestmark = pytest.mark.slow
PPCL = {
    "ppcl_teacher": {"depth": 4, "width": 0.5, "steps": 40, "prompts_per_digit": 2},
    "probe": {"calibration_size": 32},
    "depth_distill": {"data_size": 64, "steps": 5, "batch_size": 16, "workers": 2},
    "width_prune": {"data_size": 64, "steps": 5, "ffn": 1, "text_mlp": 1},
    "menu": {"prompts_per_digit": 2, "sample_steps": 4, "warmup": 2, "runs": 20, "threads": [1]},
}
STAGES = ["prepare", "train", "ppcl_teacher", "probe", "intervals", "depth_distill", "width_prune", "menu"]


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


def test_first_run_executes_every_ppcl_stage_and_writes_the_reports(project):
    outcome = run(project)
    assert executed(outcome) == STAGES
    for path in ("models/ppcl/teacher.pt", "models/ppcl/probes.pt", "models/ppcl/width.pt", "reports/ppcl_intervals.json",
                 "reports/ppcl_cka.png", "reports/ppcl_menu.md", "reports/ppcl_menu.csv", "reports/ppcl_menu.png",
                 "reports/ppcl/teacher_samples.png", "models/ppcl/onnx/teacher.onnx", "metrics/ppcl_probe.json"):
        assert (project / path).exists(), path
    assert list((project / "models/ppcl/students").glob("*_*.pt"))
    rows = (project / "reports/ppcl_menu.csv").read_text().splitlines()
    variants = [r.split(",")[0] for r in rows[1:]]
    assert variants[0] == "teacher" and len(variants) >= 5
    assert any(v.startswith("ablation") for v in variants) and any(v.endswith("_width") for v in variants)
    for v in variants:
        assert (project / f"reports/ppcl/menu/{v}_samples.png").exists(), v
    assert "up to date" in dvc(project, "status", "menu")
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(lock["menu"]["params"]["params.yaml"]) == {"menu"}


def test_second_run_executes_nothing(project):
    lock = (project / "dvc.lock").read_text()
    assert executed(run(project)) == []
    assert (project / "dvc.lock").read_text() == lock
