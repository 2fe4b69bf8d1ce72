"""The user's own files as DVC deps: the data of `prepare`, the weights and model code of `train` and after.

`params.yaml` names files that live outside the project's code (`prepare.path`, `prepare.test_path`,
`train.weights`, the file of a `train.model` factory and the project files it imports, PPCL's model folder
`ppcl_teacher.model` and its inputs `ppcl_teacher.inputs`). DVC re-runs
a stage only for a dep it knows, so every stage that reads such a file lists it in `dvc.yaml`:
`sync` rewrites those entries (the rest of dvc.yaml byte for byte) whenever params.yaml names other files;
the project's code deps and the artifacts of other stages are never touched.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from distillery.core.errors import DistilleryError
from distillery.core.params import Section
from distillery.models.factory import is_factory, source_files
from tasks.paths import CHECKPOINTS, PPCL_TEACHER

CODE_DIRS = ("distillery/", "tasks/", "flows/", "benchmarks/")
BUNDLED = ("data/raw",)  # the bundled data folder, a dep of prepare in the repo's own dvc.yaml
# The checkpoints rebuilt from train.model's spec: a stage reading one runs the user's model code.
MODEL_CHECKPOINTS = {p.as_posix() for p in CHECKPOINTS.values()}


def _as_dep(root: Path, path: str | Path) -> str:
    p = Path(path)
    full = (root / p).resolve() if not p.is_absolute() else p.resolve()
    return full.relative_to(root).as_posix() if full.is_relative_to(root) else str(full)


def wanted(root: Path, configs: dict[str, Section]) -> dict[str, list[str]]:
    """Per role, the user files params.yaml names: {"data": [...], "weights": [...], "code": [...]}."""
    root = root.resolve()
    prep, train = configs["prepare"], configs["train"]
    data = [_as_dep(root, p) for p in (prep.path, prep.test_path) if p is not None and prep.source != "digits"]
    code = [_as_dep(root, root / f) for f in source_files(train.model, root)] if is_factory(train.model) else []
    weights = [_as_dep(root, train.weights)] if train.weights is not None else []
    ppcl, ppcl_inputs = configs.get("ppcl_teacher"), []
    ppcl_model = []
    if ppcl is not None and ppcl.model not in ("digits", "text"):
        ppcl_model = [_as_dep(root, Path(ppcl.model) / (ppcl.subfolder or ""))]
        ppcl_inputs = ([_as_dep(root, root / f) for f in source_files(ppcl.inputs, root)] if is_factory(ppcl.inputs)
                       else [_as_dep(root, ppcl.inputs)])
    return {"data": data, "weights": weights, "code": code, "ppcl_model": ppcl_model, "ppcl_inputs": ppcl_inputs}


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies in it (a templated out counts by its prefix, `models/ablation/`)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _overlaps(dep: str, produced: list[str]) -> bool:
    """Whether a stage writes `dep`, a file inside it, or a folder holding it."""
    return any(_inside(dep, p) or _inside(p, dep) for p in produced)


def plan(root: Path, configs: dict[str, Section], stages: dict) -> dict[str, list[str]]:
    """The deps each stage should have: its own entries kept, the user entries replaced by what params name."""
    files = wanted(root, configs)
    produced = [str(o if isinstance(o, str) else next(iter(o))).split("${")[0] for st in stages.values()
                for kind in ("outs", "metrics", "plots") for o in st.get("do", st).get(kind, [])]
    new = {}
    for name, st in stages.items():
        body = st.get("do", st)
        deps = [str(d) for d in body.get("deps", [])]
        if name == "prepare":
            extra = files["data"]
        elif name == "train":
            extra = files["code"] + files["weights"]
        elif MODEL_CHECKPOINTS & set(deps) or name == "ppcl_teacher" or PPCL_TEACHER.as_posix() in deps:
            extra = files["code"] if MODEL_CHECKPOINTS & set(deps) else []
            if name == "ppcl_teacher":
                extra = extra + files["ppcl_model"] + files["ppcl_inputs"]
            elif PPCL_TEACHER.as_posix() in deps:  # reads the user's PPCL model folder in place
                extra = extra + files["ppcl_model"]
        else:
            continue
        own = [d for d in deps if d.startswith(CODE_DIRS) or d in BUNDLED or _overlaps(d, produced)]
        extra = [e for e in extra if not any(_inside(e, o) for o in own)]
        if own + extra != deps:
            new[name] = own + extra
    return new


def _flow_list(items: list[str], indent: int, width: int = 118) -> str:
    """A YAML flow sequence wrapped at `width`, continuation lines aligned after the bracket."""
    quoted = [i if re.fullmatch(r"[\w./@+-]+", i) else json.dumps(i) for i in items]
    lines, line = [], ""
    for item in quoted:
        piece = f"{item}, "
        if line and indent + len(line) + len(piece) > width:
            lines.append(line.rstrip())
            line = ""
        line += piece
    lines.append(line.rstrip().rstrip(","))
    return "[" + ("\n" + " " * indent).join(lines) + "]"


def sync(root: Path | str, configs: dict[str, Section], write: bool = True) -> list[str]:
    """Bring dvc.yaml's user-file deps in line with params.yaml; returns one line per stage changed.

    Only the `deps:` lists of the changed stages are rewritten, in place: the rest of the file
    (comments, layout, the other stages) stays byte for byte.
    """
    root = Path(root).resolve()
    path = root / "dvc.yaml"
    text = path.read_text()
    stages = yaml.safe_load(text)["stages"]
    changes = plan(root, configs, stages)
    lines = []
    for name, deps in changes.items():
        before = [str(d) for d in stages[name].get("do", stages[name])["deps"]]
        added = [d for d in deps if d not in before]
        removed = [d for d in before if d not in deps]
        header = re.search(rf"(?m)^  {re.escape(name)}:\s*$", text)
        block = re.compile(r"(?m)^(?P<lead>\s+deps: )\[[^\]]*\]")
        found = block.search(text, header.end()) if header else None
        if found is None:
            raise DistilleryError(f"dvc.yaml: stage {name!r} has no `deps: [...]` list to update; add its deps "
                                  f"{', '.join(added)} by hand")
        text = text[:found.start()] + found["lead"] + _flow_list(deps, len(found["lead"]) + 1) + text[found.end():]
        lines.append(f"dvc.yaml: {name} deps" + (f" + {', '.join(added)}" if added else "")
                     + (f" - {', '.join(removed)}" if removed else ""))
    if changes:
        check = yaml.safe_load(text)["stages"]
        if any(check[n].get("do", check[n])["deps"] != d for n, d in changes.items()):
            raise DistilleryError("dvc.yaml: rewriting the deps lists went wrong (an unusual layout?); "
                                  f"add by hand: {'; '.join(lines)}")
        if write:
            tmp = path.with_suffix(".yaml.tmp")
            tmp.write_text(text)
            tmp.replace(path)
    return lines
