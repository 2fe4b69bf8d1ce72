"""The registry on a real git + DVC repo in tmp_path (tiny ONNX files, metrics from params) and a real SQLite MLflow."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import yaml

from flows.dvc_stages import reproduce_stage, stage_order
from flows.pipeline import recipe_run
from flows.lineage import lineage
from flows.registry import (CHAMPION, Headline, RegistryError, pick_champion, register_models,
                            registered_name)
from repos import init_git_dvc

DEPLOYED = {"teacher": "models/teacher.fp32.onnx", "pruned": "models/pqd/pruned.fp32.onnx",
            "quantized": "models/pqd/quantized.int8.onnx", "distilled": "models/pqd/student.int8.onnx"}
ACCURACY = {"teacher": 0.95, "pruned": 0.945, "quantized": 0.935, "distilled": 0.941}  # quantized: 1.5 points down
P50_MS = {"teacher": 10.0, "pruned": 6.0, "quantized": 3.0, "distilled": 4.0}
LOGGED_BY_EXPORT = ("teacher", "pruned", "quantized")  # distilled: the registry logs it itself
ONNX = list(DEPLOYED.values())
DVC_YAML = {"stages": {
    "export": {"cmd": "python src/export.py", "deps": ["src/export.py"], "params": ["export"], "outs": ONNX},
    "evaluate": {"cmd": "python src/evaluate.py", "deps": ["src/evaluate.py", *ONNX], "params": ["evaluate"],
                 "metrics": [{"metrics/evaluate.json": {"cache": False}}]},
    "benchmark": {"cmd": "python src/benchmark.py", "deps": ["src/benchmark.py", *ONNX], "params": ["benchmark"],
                  "metrics": [{"metrics/benchmark.json": {"cache": False}}]},
}}
BODIES = {
    "export": "import pathlib, onnx, yaml\nfrom onnx import helper, TensorProto\n"
              f"DEPLOYED = {DEPLOYED!r}\n"
              "seed = yaml.safe_load(open('params.yaml'))['export']['seed']\n"
              "for name, path in DEPLOYED.items():\n"
              "    x = helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 4])\n"
              "    y = helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 4])\n"
              "    graph = helper.make_graph([helper.make_node('Identity', ['x'], ['y'])], f'{name}-{seed}', [x], [y])\n"
              "    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)\n"
              "    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)]), path)\n"
              "import mlflow\n"  # as export's tracking.log_onnx_model does, minus the slow requirement inference
              f"for name in {LOGGED_BY_EXPORT!r}:\n"
              "    mlflow.onnx.log_model(onnx.load(DEPLOYED[name]), name=name, pip_requirements=['onnx', 'onnxruntime'])\n",
    "evaluate": "import json, pathlib, yaml\nacc = yaml.safe_load(open('params.yaml'))['evaluate']['accuracy']\n"
                "pathlib.Path('metrics').mkdir(exist_ok=True)\n"
                "json.dump({m: {'accuracy': a, 'n': 100} for m, a in acc.items()}, open('metrics/evaluate.json', 'w'))\n",
    "benchmark": "import json, os, pathlib, yaml\n"
                 f"DEPLOYED = {DEPLOYED!r}\n"
                 "p50 = yaml.safe_load(open('params.yaml'))['benchmark']['p50']\n"
                 "models = {m: {'threads_1': {'p50_ms': p, 'speedup_p50': p50['teacher'] / p},\n"
                 "              'threads_all': {'p50_ms': p / 2, 'speedup_p50': p50['teacher'] / p},\n"
                 "              'size_bytes': os.path.getsize(DEPLOYED[m])} for m, p in p50.items()}\n"
                 "pathlib.Path('metrics').mkdir(exist_ok=True)\n"
                 "json.dump({'models': models, 'cpu': {'cpu_model': 'test'}}, open('metrics/benchmark.json', 'w'))\n",
}


SCRIPTS = {  # each stand-in stage records its nested MLflow run as the real stages do
    name: "import yaml\nfrom distillery.core.tracking import stage_run\n"
          f"with stage_run({name!r}, {{}}):\n" + textwrap.indent(body, "    ")
    for name, body in BODIES.items()}


def set_params(root: Path, **sections) -> None:
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text()) if path.exists() else {}
    params.update(sections)
    path.write_text(yaml.safe_dump(params))


def make_project(root: Path) -> Path:
    root.mkdir()
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    set_params(root, export={"seed": 0}, evaluate={"accuracy": ACCURACY}, benchmark={"p50": P50_MS})
    (root / "src").mkdir()
    for name, code in SCRIPTS.items():
        (root / "src" / f"{name}.py").write_text(code)
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\n")
    return init_git_dvc(root)


def run_pipeline(root: Path, recipe: str = "pqd") -> tuple[str, dict[str, str]]:
    """The pipeline flow's own steps (its parent run, DVC's order, `reproduce_stage`) minus Prefect's task
    wrapper; each stand-in stage opens its nested run as the real stages do. Returns (parent, stage -> run)."""
    runs = {}
    with recipe_run(recipe, root) as (parent, outcome):
        for stage in stage_order(root, ["evaluate", "benchmark"]):
            outcome[stage], run_id = reproduce_stage(root, stage, parent)
            if run_id:
                runs[stage] = run_id
    return parent, runs


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("registry") / "p")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
        mp.chdir(root)
        parent, runs = run_pipeline(root)
        yield root, parent, runs


def versions(name: str = registered_name("pqd")) -> dict[str, list]:
    out: dict[str, list] = {}
    for mv in mlflow.MlflowClient().search_model_versions(f"name = '{name}'"):
        out.setdefault(mv.tags["distillery.model"], []).append(mv)
    return out


def champion() -> str:
    return mlflow.MlflowClient().get_model_version_by_alias(registered_name("pqd"), CHAMPION).tags["distillery.model"]


def md5_in_lock(root: Path, path: str) -> str:
    outs = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["export"]["outs"]
    return next(o["md5"] for o in outs if o["path"] == path)


def test_champion_rule_is_the_fastest_within_one_point_of_the_teacher():
    def h(acc, p50):
        return Headline(acc, p50, None, None, None)
    figures = {"teacher": h(0.95, 10.0), "pruned": h(0.945, 6.0), "quantized": h(0.935, 3.0), "distilled": h(0.941, 4.0)}
    assert pick_champion(figures) == "distilled"  # quantized is faster but 1.5 points down
    assert pick_champion({**figures, "edge": h(0.94, 3.5)}) == "edge"  # exactly one point down still counts
    assert pick_champion({"teacher": h(0.95, 10.0), "slow": h(0.99, 11.0)}) == "teacher"
    assert pick_champion({"pruned": h(0.9, 1.0)}) is None  # no teacher, no rule


def test_register_tags_each_version_with_its_lineage_and_metrics_and_sets_champion(project):
    root, parent, runs = project
    done = register_models("pqd", root, parent, models=DEPLOYED)
    assert done.champion == "distilled" and set(done.versions) == set(DEPLOYED)
    found = versions()
    assert {m: len(v) for m, v in found.items()} == dict.fromkeys(DEPLOYED, 1)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    bench = json.loads((root / "metrics/benchmark.json").read_text())["models"]
    for model, path in DEPLOYED.items():
        mv = found[model][0]
        assert mv.tags["dvc.path"] == path and mv.tags["dvc.md5"] == md5_in_lock(root, path)
        assert mv.tags["distillery.stage"] == "export" and mv.tags["distillery.producing_run_id"] == runs["export"]
        assert mv.tags["distillery.parent_run_id"] == parent and mv.tags["distillery.recipe"] == "pqd"
        assert mv.tags["git.commit"].removesuffix("-dirty") == head
        assert float(mv.tags["metrics.accuracy"]) == ACCURACY[model]
        assert float(mv.tags["metrics.latency.p50_ms.threads_1"]) == P50_MS[model]
        assert int(mv.tags["metrics.size_bytes"]) == bench[model]["size_bytes"] == (root / path).stat().st_size
        logged = mlflow.get_logged_model(mv.source.removeprefix("models:/"))
        assert logged.source_run_id == (runs["export"] if model in LOGGED_BY_EXPORT else parent)
        assert str(mlflow.MlflowClient().get_model_version_by_alias(registered_name("pqd"), model).version) == str(mv.version)
    assert champion() == "distilled"
    assert mlflow.get_run(parent).data.tags["distillery.champion"].startswith("distilled")


def test_registering_unchanged_files_adds_no_version_and_the_champion_follows_new_figures(project):
    root, _, _ = project
    set_params(root, benchmark={"p50": {**P50_MS, "pruned": 2.0}})  # pruned now fastest and within a point
    parent, runs = run_pipeline(root)
    assert set(runs) == {"benchmark"}
    register_models("pqd", root, parent, models=DEPLOYED)
    found = versions()
    assert {m: len(v) for m, v in found.items()} == dict.fromkeys(DEPLOYED, 1)
    assert champion() == "pruned"
    assert float(found["pruned"][0].tags["metrics.latency.p50_ms.threads_1"]) == 2.0
    assert found["pruned"][0].tags["distillery.parent_run_id"] == parent


def test_a_changed_model_file_is_a_new_version_and_its_alias_moves(project):
    root, _, _ = project
    before = {m: v[0].version for m, v in versions().items()}
    set_params(root, export={"seed": 1})
    parent, runs = run_pipeline(root)
    assert set(runs) == {"export", "evaluate", "benchmark"}
    done = register_models("pqd", root, parent, models=DEPLOYED)
    found = versions()
    assert {m: len(v) for m, v in found.items()} == dict.fromkeys(DEPLOYED, 2)
    for model, path in DEPLOYED.items():
        assert int(done.versions[model]) > int(before[model])
        latest = mlflow.MlflowClient().get_model_version_by_alias(registered_name("pqd"), model)
        assert str(latest.version) == done.versions[model] and latest.tags["dvc.md5"] == md5_in_lock(root, path)
        assert latest.tags["distillery.producing_run_id"] == runs["export"]


def test_lineage_of_the_champion_resolves_through_the_registry(project):
    root, _, _ = project
    graph = lineage(root, f"models:/{registered_name('pqd')}@champion")
    assert graph["target"] == DEPLOYED[champion()]
    assert graph["registered"]["name"] == registered_name("pqd") and "note" not in graph["registered"]
    producer = graph["registered"]["tags"]["distillery.producing_run_id"]
    assert graph["stages"]["export"]["run"]["run_id"] == producer
    assert graph["artifacts"]["src/export.py"]["kind"] == "code"
    by_name = lineage(root, registered_name("pqd"))  # a bare name means its champion
    assert by_name["target"] == graph["target"]
    old = lineage(root, f"{registered_name('pqd')}/1")  # version 1 predates export.seed=1: flagged
    assert "note" in old["registered"] and old["registered"]["md5"] != old["md5"]


def test_missing_metrics_and_unknown_files_are_clear_errors(project, tmp_path):
    root, parent, _ = project
    with pytest.raises(RegistryError, match="models/nope.onnx: not an out"):
        register_models("pqd", root, parent, models={**DEPLOYED, "teacher": "models/nope.onnx"})
    with pytest.raises(RegistryError, match="no accuracy and latency for extra"):
        register_models("pqd", root, parent, models={**DEPLOYED, "extra": DEPLOYED["teacher"]})
    with pytest.raises(RegistryError, match="evaluate.json: missing"):
        register_models("pqd", tmp_path, parent, models=DEPLOYED)


def test_only_a_recipe_that_deploys_models_registers_them(project):
    """PPCL's or the ablation's name never labels PQD's files in the registry."""
    for recipe in ("ppcl", "ablation", "nonsense"):
        with pytest.raises(RegistryError, match=f"recipe '{recipe}' deploys no models to register"):
            register_models(recipe, project[0])
