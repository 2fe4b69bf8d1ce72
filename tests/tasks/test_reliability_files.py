"""Unsafe and broken files: a stage given a truncated checkpoint, a truncated ONNX or a data file in the
wrong format stops with exit 2 and one line naming the file; no code ever loads a user file unsafely."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from distillery.core.artifacts import save_checkpoint, write_json, write_npz
from distillery.models import build_model
from distillery.data import load_digits_bundled, prepare_splits

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path):
    """A project folder with prepared data (8x8 digits) and a toy teacher, as the stages expect."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    splits, meta = prepare_splits(*load_digits_bundled(), 8, False, 0.15, 0.2, 0)
    for name, (x, y) in splits.items():
        write_npz(tmp_path / "data/prepared" / f"{name}.npz", x=x, y=y)
    write_json(tmp_path / "data/prepared/meta.json", meta)
    spec = {"arch": "toy", "width": 0.5, "depth": 1, "in_channels": 1, "num_classes": 10}
    save_checkpoint(tmp_path / "models/teacher.pt", build_model(spec), spec)
    return tmp_path


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def stage(project: Path, module: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
           "PYTHONPATH": str(ROOT)}  # the stages' code; the project folder holds only data and params
    env.pop("DISTILLERY_DEBUG", None)
    return subprocess.run([sys.executable, "-m", module], cwd=project, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_clear_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def stage_statuses(project: Path) -> list[str]:
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return [r.info.status for r in mlflow.search_runs(search_all_experiments=True, output_format="list")]


def test_export_with_a_truncated_checkpoint_names_the_file(project):
    truncate(project / "models/teacher.pt")
    proc = stage(project, "tasks.export")
    assert_clear_error(proc, "models/teacher.pt", "truncated or corrupt", "dvc checkout")
    assert stage_statuses(project) == ["FAILED"]  # the stage's MLflow run is closed, not left RUNNING
    assert not (project / "models/teacher.fp32.onnx").exists()


def test_evaluate_with_a_truncated_onnx_names_the_file(project):
    from distillery.onnx_export import export_fp32_onnx
    from distillery.models import load_model
    model, _ = load_model(project / "models/teacher.pt")
    onnx_path = export_fp32_onnx(model, (torch.zeros(1, 1, 8, 8),), project / "models/teacher.fp32.onnx")
    truncate(onnx_path)
    proc = stage(project, "tasks.evaluate")
    assert_clear_error(proc, "models/teacher.fp32.onnx", "not a loadable ONNX model", "re-run the export stage")
    assert not (project / "metrics/evaluate.json").exists()


def test_prepare_with_a_data_file_in_the_wrong_format_names_the_file(project):
    (project / "data/raw").mkdir(parents=True)
    (project / "data/raw/digits.npz").write_text("label,pixels\n3,0 0 0\n")  # a CSV saved as .npz
    prepared = {p.name: p.read_bytes() for p in (project / "data/prepared").iterdir()}
    proc = stage(project, "tasks.prepare")
    assert_clear_error(proc, "data/raw/digits.npz", "not a readable NPZ file", "numpy.savez")
    assert {p.name: p.read_bytes() for p in (project / "data/prepared").iterdir()} == prepared  # old outputs kept


def _is(node: ast.AST, module: str, name: str) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == name and isinstance(node.value, ast.Name) \
        and node.value.id == module


def _kw(call: ast.Call, name: str):
    return next((k.value.value for k in call.keywords if k.arg == name and isinstance(k.value, ast.Constant)), None)


def test_no_unsafe_loads_in_the_source_tree():
    """torch.load only with weights_only=True; no pickle.load(s), no allow_pickle=True, no Unpickler without find_class."""
    problems = []
    files = [f for d in ("distillery", "tasks", "flows", "benchmarks") for f in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 10
    for f in files:
        tree = ast.parse(f.read_text(), str(f))
        where = lambda n: f"{f.relative_to(ROOT)}:{n.lineno}"  # noqa: E731
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "torch", "dill", "joblib") and \
                    any(a.name in ("load", "loads") for a in node.names):
                problems.append(f"{where(node)}: imports {node.module}.load by name (cannot be checked)")
            if isinstance(node, ast.Call):
                if _is(node.func, "torch", "load") and _kw(node, "weights_only") is not True:
                    problems.append(f"{where(node)}: torch.load without weights_only=True")
                if any(_is(node.func, m, n) for m in ("pickle", "dill", "joblib", "cloudpickle") for n in ("load", "loads")):
                    problems.append(f"{where(node)}: unrestricted unpickling")
                if _is(node.func, "np", "load") and _kw(node, "allow_pickle") is True:
                    problems.append(f"{where(node)}: np.load(allow_pickle=True)")
            if isinstance(node, ast.ClassDef) and any(_is(b, "pickle", "Unpickler") for b in node.bases):
                if not any(isinstance(b, ast.FunctionDef) and b.name == "find_class" for b in node.body):
                    problems.append(f"{where(node)}: Unpickler subclass without a restricting find_class")
    assert not problems, "\n".join(problems)
