"""The house rules that keep "re-run only what changed" and the lineage audit true for code.

- every project module a stage's command imports (transitively, function-local imports too) is a
  dep of that stage in dvc.yaml, and no .py dep is one the stage does not import;
- the library imports no stage, flow, Prefect, MLflow or DVC; a stage imports no other stage;
- there is no import cycle between project modules;
- editing a KD-only module in a real DVC repo makes `dvc status` report distill and what follows,
  never prepare, train, prune or quantize.
"""
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from repos import init_git_dvc

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distillery", "tasks", "flows", "benchmarks")


def module_file(mod: str) -> Path | None:
    p = ROOT.joinpath(*mod.split("."))
    for cand in (p.with_suffix(".py"), p / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module name an `import` anywhere in `path` may load (a package's members included)."""
    pkg = path.relative_to(ROOT).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ((base,) if base else ()))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def project_imports(path: Path) -> set[Path]:
    """The project files `path` imports directly (a package's __init__ runs on import of its members)."""
    files = set()
    for name in imported_modules(path):
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            f = module_file(".".join(parts[:i]))
            if f is not None:
                files.add(f)
    return files - {path}


def closure(path: Path) -> set[Path]:
    seen, todo = {path}, [path]
    while todo:
        for f in project_imports(todo.pop()):
            if f not in seen:
                seen.add(f)
                todo.append(f)
    for f in list(seen):  # the packages above a module run first
        for parent in f.relative_to(ROOT).parents[:-1]:
            init = ROOT / parent / "__init__.py"
            if init.is_file():
                seen.add(init)
    return seen


def stages() -> dict[str, dict]:
    out = {}
    for name, st in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        body = st.get("do", st)
        module = re.search(r"python -m ([\w.]+)", body["cmd"]).group(1)
        out[name] = {"module": module, "deps": [str(d).rstrip("/") for d in body["deps"]]}
    return out


def covered(rel: str, deps: list[str]) -> bool:
    return any(rel == d or rel.startswith(d + "/") for d in deps)


def test_every_module_a_stage_imports_is_one_of_its_deps_and_no_code_dep_is_stale():
    problems = []
    for name, st in stages().items():
        code = {str(f.relative_to(ROOT)) for f in closure(module_file(st["module"]))}
        missing = sorted(f for f in code if not covered(f, st["deps"]))
        stale = sorted(d for d in st["deps"] if d.endswith(".py") and d not in code)
        if missing:
            problems.append(f"{name}: imports but does not depend on {', '.join(missing)}")
        if stale:
            problems.append(f"{name}: depends on code it does not import: {', '.join(stale)}")
    assert not problems, "dvc.yaml code deps are wrong:\n" + "\n".join(problems)


def test_kd_code_is_a_dep_of_the_stages_that_distill_only():
    users = {name for name, st in stages().items() if covered("distillery/compress/kd.py", st["deps"])}
    assert users == {"distill", "ablation", "counterpart"}


def test_layers_import_only_downwards_and_stages_never_import_stages():
    stage_modules = {module_file(st["module"]) for st in stages().values()}
    problems = []
    for f in sorted((ROOT / "distillery").rglob("*.py")):
        for name in imported_modules(f):
            top = name.split(".")[0]
            if top in ("tasks", "flows", "benchmarks", "prefect", "dvc", "dvc_data"):
                problems.append(f"{f.relative_to(ROOT)} imports {name}")
            if top == "mlflow" and f.relative_to(ROOT) != Path("distillery/core/tracking.py"):
                problems.append(f"{f.relative_to(ROOT)} imports {name} (only distillery/core/tracking.py may)")
            if f.relative_to(ROOT).parts[:2] == ("distillery", "core") and name.startswith(
                    ("distillery.compress", "distillery.ppcl", "distillery.models", "distillery.training")):
                problems.append(f"{f.relative_to(ROOT)} (plumbing) imports the algorithm {name}")
    for f in sorted((ROOT / "tasks").glob("*.py")):
        for dep in project_imports(f):
            if dep in stage_modules and dep != f:
                problems.append(f"stage {f.relative_to(ROOT)} imports stage {dep.relative_to(ROOT)}")
            if dep.relative_to(ROOT).parts[0] == "flows":
                problems.append(f"stage {f.relative_to(ROOT)} imports the flow {dep.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    graph = {f: project_imports(f) for p in PACKAGES for f in (ROOT / p).rglob("*.py")}
    for f in graph:  # a package's own __init__ is not a cycle with its members
        graph[f] = {d for d in graph[f] if not (d.name == "__init__.py" and f.is_relative_to(d.parent))}
    state, cycles = {}, []

    def visit(f, stack):
        state[f] = "open"
        for d in graph.get(f, ()):
            if state.get(d) == "open":
                cycles.append(" -> ".join(str(x.relative_to(ROOT)) for x in stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[f] = "done"
    for f in graph:
        if f not in state:
            visit(f, [f])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_library_imports_without_prefect_mlflow_or_dvc():
    code = ("import sys, distillery.compress.chain, distillery.compress.checkpoint, distillery.compress.ptq, "
            "distillery.ppcl.depth, distillery.ppcl.width, distillery.ppcl.cka, distillery.latency, distillery.data; "
            "print(sorted(m for m in ('prefect', 'mlflow', 'dvc', 'tasks', 'flows') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout
    assert out.strip() == "[]"


def test_only_the_library_is_installed(tmp_path):
    """Outside the project, `tasks` and `flows` are not importable: no generic names in site-packages."""
    code = "import importlib.util as u; print([n for n in ('distillery', 'tasks', 'flows') if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert out.strip() == "['distillery']"


def test_the_distillery_command_finds_the_project_from_a_subfolder_and_refuses_elsewhere(tmp_path):
    exe = Path(sys.executable).parent / "distillery"
    inside = subprocess.run([str(exe), "--help"], capture_output=True, text=True, cwd=ROOT / "tests", timeout=120)
    assert inside.returncode == 0 and "validate" in inside.stdout
    outside = subprocess.run([str(exe), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert outside.returncode == 2 and "not inside a Distillery project" in outside.stderr


@pytest.mark.slow
def test_editing_a_kd_module_makes_dvc_report_distill_and_descendants_only(tmp_path):
    """A real DVC repo whose lock records every stage as run; then one appended comment in kd.py."""
    project = tmp_path / "p"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, project / name)
    for name in ("distillery", "tasks", "data/raw"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    init_git_dvc(project)
    outs = set()
    for st in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].values():
        body = st.get("do", st)
        for out in body.get("outs", []) + body.get("metrics", []) + body.get("plots", []):
            outs.add(next(iter(out)) if isinstance(out, dict) else out)
    for out in outs:  # every output exists, so `dvc commit` can record the whole graph as run
        path = project / out.replace("${key}", "pqd")
        if "." in path.name:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x\n")
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "f").write_text("x\n")
    (project / "data/prepared").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (project / f"data/prepared/{split}.npz").write_text("x\n")
    (project / "data/prepared/meta.json").write_text("{}\n")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ablation"]["orders"] = {"pqd": {}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def dvc(*args):
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True,
                              check=True).stdout
    dvc("commit", "-f", "-q")
    assert "up to date" in dvc("status")
    with open(project / "distillery/compress/kd.py", "a") as f:
        f.write("# an edit\n")
    changed = {line.rstrip(":").strip() for line in dvc("status").splitlines()
               if line and not line.startswith(("\t", " ")) and line.rstrip().endswith(":")}
    assert changed == {"distill", "ablation@pqd", "counterpart"}  # export and later change when distill's output does


def test_no_undefined_names_or_unused_imports():
    """Pyflakes' checks (ruff's F rules): a moved function leaves no dangling name behind."""
    ruff = Path(sys.executable).parent / "ruff"
    proc = subprocess.run([str(ruff), "check", "--select", "F", "--no-cache", "--output-format", "concise",
                           *PACKAGES, "tests"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_the_distillery_command_keeps_the_callers_folder_and_honours_root(tmp_path):
    """Relative paths mean what they mean to the caller; `--root` names the project from anywhere."""
    exe = Path(sys.executable).parent / "distillery"
    shutil.copy(ROOT / "params.yaml", tmp_path / "mine.yaml")
    here = subprocess.run([str(exe), "validate", "--params", "mine.yaml"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert here.returncode == 2 and "not inside a Distillery project" in here.stderr  # no project here or above
    rooted = subprocess.run([str(exe), "register", "nonsense", "--root", str(ROOT)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert rooted.returncode == 2 and "recipe 'nonsense' deploys no models" in rooted.stderr  # flows/cli.py ran
    inside = subprocess.run([str(exe), "validate", "--params", "../params.yaml"], capture_output=True, text=True,
                            cwd=ROOT / "tests", timeout=120)
    assert inside.returncode == 0 and "../params.yaml: ok" in inside.stdout


def test_the_distillery_command_works_from_a_subfolder_of_the_project(tmp_path):
    exe = Path(sys.executable).parent / "distillery"
    out = subprocess.run([str(exe), "validate"], capture_output=True, text=True, cwd=ROOT / "tests", timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"{ROOT / 'params.yaml'}: ok"
    out = subprocess.run([str(exe), "params", "export"], capture_output=True, text=True, cwd=ROOT / "tests", timeout=120)
    assert out.returncode == 0 and "opset = 18" in out.stdout
