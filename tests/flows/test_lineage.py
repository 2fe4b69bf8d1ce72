"""Lineage and verify on a real git + DVC repo in tmp_path: three tiny stages, a real SQLite MLflow store."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.dvc_stages import reproduce_stage, stage_order
from flows.lineage import trace, verify
from flows.pipeline import recipe_run
from repos import init_git_dvc

DVC_YAML = {"stages": {
    "prepare": {"cmd": "python src/prepare.py", "deps": ["src/prepare.py", "data/raw"], "params": ["prepare"],
                "outs": ["data/prepared"]},
    "train": {"cmd": "python src/train.py", "deps": ["src/train.py", "data/prepared"], "params": ["train"],
              "outs": ["models/teacher.pt"]},
    "export": {"cmd": "python src/export.py", "deps": ["src/export.py", "models/teacher.pt", "data/prepared/test.txt"],
               "outs": ["models/teacher.fp32.onnx"]},
}}
BODIES = {  # stdlib + yaml only: each stage's work takes a fraction of a second
    "prepare": "import pathlib, yaml\n"
               "n = yaml.safe_load(open('params.yaml'))['prepare']['repeat']\n"
               "raw = ''.join(f.read_text() for f in sorted(pathlib.Path('data/raw').iterdir()))\n"
               "out = pathlib.Path('data/prepared'); out.mkdir(exist_ok=True)\n"
               "(out / 'train.txt').write_text(raw * n); (out / 'test.txt').write_text(raw[::-1])\n",
    "train": "import pathlib, yaml\n"
             "lr = yaml.safe_load(open('params.yaml'))['train']['lr']\n"
             "pathlib.Path('models').mkdir(exist_ok=True)\n"
             "pathlib.Path('models/teacher.pt').write_bytes(f'lr={lr}'.encode() + open('data/prepared/train.txt', 'rb').read())\n",
    "export": "import pathlib\n"
              "pathlib.Path('models/teacher.fp32.onnx').write_bytes(b'onnx' + open('models/teacher.pt', 'rb').read()[::-1])\n",
}


SCRIPTS = {  # each stand-in stage records its nested MLflow run as the real stages do
    name: "import yaml\nfrom distillery.core.tracking import stage_run\n"
          f"with stage_run({name!r}, yaml.safe_load(open('params.yaml')).get({name!r}, {{}})):\n"
          + textwrap.indent(body, "    ")
    for name, body in BODIES.items()}


def make_project(root: Path) -> Path:
    root.mkdir()
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump({"prepare": {"repeat": 3}, "train": {"lr": 0.1}}))
    (root / "src").mkdir()
    for name, code in SCRIPTS.items():
        (root / "src" / f"{name}.py").write_text(code)
    (root / "data/raw").mkdir(parents=True)
    (root / "data/raw/a.txt").write_text("raw digits a\n")
    (root / "data/raw/b.txt").write_text("raw digits b\n")
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\n")
    return init_git_dvc(root)


def run_pipeline(root: Path, recipe: str = "pqd") -> dict[str, str]:
    """The pipeline flow's own steps (its parent run, DVC's order, `reproduce_stage`) minus Prefect's task
    wrapper; each stand-in stage opens its nested run as the real stages do. Returns stage -> run id."""
    runs = {}
    with recipe_run(recipe, root) as (parent, outcome):
        for stage in stage_order(root, ["export"]):
            outcome[stage], run_id = reproduce_stage(root, stage, parent)
            if run_id:
                runs[stage] = run_id
    return runs


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("lineage") / "p")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])  # `python` in stage cmds
        mp.chdir(root)
        runs = run_pipeline(root)
        yield root, runs


def lock(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def head(root: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def test_lineage_walks_from_the_export_down_to_raw_data_with_each_stage_run_and_commit(project):
    root, runs = project
    graph = trace(root, "models/teacher.fp32.onnx")
    recorded = lock(root)
    assert graph["md5"] == recorded["export"]["outs"][0]["md5"]
    assert set(graph["stages"]) == {"export", "train", "prepare"}
    assert graph["artifacts"]["models/teacher.pt"] == {"md5": recorded["train"]["outs"][0]["md5"], "kind": "output",
                                                      "stage": "train", "within": None}
    assert graph["artifacts"]["data/prepared/test.txt"]["within"] == "data/prepared"
    raw = graph["artifacts"]["data/raw"]
    assert raw["kind"] == "data" and raw["stage"] is None and raw["md5"].endswith(".dir")
    assert raw["md5"] == next(d["md5"] for d in recorded["prepare"]["deps"] if d["path"] == "data/raw")
    assert graph["artifacts"]["src/train.py"]["kind"] == "code"
    assert graph["stages"]["train"]["params"] == {"train.lr": 0.1}
    for stage, run_id in runs.items():
        run = graph["stages"][stage]["run"]
        assert run["run_id"] == run_id and run["recipe"] == "pqd"
        assert run["git_commit"].removesuffix("-dirty") == head(root)
    assert graph["stale"] == []


def test_lineage_picks_the_run_that_wrote_the_recorded_version_not_the_latest(project):
    root, runs = project
    with mlflow.start_run(run_name="train", tags={"distillery.stage": "train", "distillery.kind": "stage",
                                                  "dvc.outs.models/teacher.pt": "0" * 32}):
        pass  # a later run of train whose output was never kept
    assert trace(root, "models/teacher.pt")["stages"]["train"]["run"]["run_id"] == runs["train"]


def test_lineage_cli_prints_the_chain_and_json(project):
    root, runs = project
    text = CliRunner().invoke(app, ["lineage", "models/teacher.fp32.onnx", "--root", str(root)])
    assert text.exit_code == 0, text.output
    for needle in ("stage export", "stage train", "stage prepare", "data/raw", "src/prepare.py", runs["prepare"]):
        assert needle in text.output
    as_json = CliRunner().invoke(app, ["lineage", str(root / "data/prepared/test.txt"), "--json", "--root", str(root)])
    graph = json.loads(as_json.output)
    assert graph["target"] == "data/prepared/test.txt" and list(graph["stages"]) == ["prepare"]
    assert graph["md5"] == next(d["md5"] for d in lock(root)["export"]["deps"] if d["path"] == "data/prepared/test.txt")
    unknown = CliRunner().invoke(app, ["lineage", "models/nope.onnx", "--root", str(root)])
    assert unknown.exit_code == 2 and "models/nope.onnx" in unknown.output


def flip_byte(path: Path) -> bytes:
    original = path.read_bytes()
    path.write_bytes(original[:5] + bytes([original[5] ^ 1]) + original[6:])
    return original


@pytest.mark.parametrize("victim", ["models/teacher.pt", "data/prepared/train.txt", "src/export.py"])
def test_verify_names_a_file_with_one_byte_changed_and_passes_once_it_is_restored(project, victim):
    root, _ = project
    checked, problems = verify(root, "models/teacher.fp32.onnx")
    assert problems == [] and checked >= 8
    original = flip_byte(root / victim)
    try:
        _, problems = verify(root, "models/teacher.fp32.onnx")
        assert len(problems) == 1 and problems[0].startswith(f"{victim}: md5 ")
        result = CliRunner().invoke(app, ["verify", "models/teacher.fp32.onnx", "--root", str(root)])
        assert result.exit_code == 1 and victim in result.output
    finally:
        (root / victim).write_bytes(original)
    assert verify(root, "models/teacher.fp32.onnx")[1] == []
    assert verify(root)[1] == []


def test_verify_names_a_missing_file_and_ignores_artifacts_outside_the_chain(project):
    root, _ = project
    victim = root / "data/prepared/test.txt"
    original = victim.read_bytes()
    victim.unlink()
    try:
        _, problems = verify(root, "models/teacher.pt")  # train reads the folder: the file inside is named
        assert [p.split(":")[0] for p in problems] == ["data/prepared/test.txt"] and "missing" in problems[0]
        _, problems = verify(root, "models/teacher.fp32.onnx")
        assert all(p.startswith("data/prepared/test.txt: missing") for p in problems)
    finally:
        victim.write_bytes(original)
    raw = root / "data/raw/a.txt"
    original = flip_byte(raw)
    try:
        _, problems = verify(root, "data/prepared/test.txt")
        assert len(problems) == 1 and problems[0].startswith("data/raw: folder md5")  # deps' file lists are not cached
    finally:
        raw.write_bytes(original)
    result = CliRunner().invoke(app, ["verify", "--root", str(root)])
    assert result.exit_code == 0 and "match dvc.lock" in result.output
