"""Lineage audit: what produced an artifact, down to the raw data, and is every file still intact.

`dvc.lock` is the record of what each stage consumed and wrote (the md5 of every dep and out, the
params used); each stage's MLflow run carries the md5s of its outs as tags (`dvc.outs.<path>`, set
by flows/dvc_stages.py), which links a lock record to the run that executed it and its git commit.
`trace` joins the two into a graph; `verify` re-hashes the files with DVC's own hashing (no state
cache: every byte is read again) and names each one that is missing or differs from the lock.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from distillery.core.errors import DistilleryError
from distillery.core.tracking import flatten

TAG_PATH, TAG_MD5 = "dvc.path", "dvc.md5"  # registry version tags: the file and its DVC md5


class LineageError(DistilleryError):
    """An artifact that dvc.lock, the registry or the files on disk cannot account for."""


@dataclass(frozen=True)
class Record:
    """One artifact as dvc.lock recorded it: written by a stage (out) or read by one (dep)."""
    path: str
    md5: str
    hash_name: str  # "md5" (DVC 3); entries from DVC 2 lock files are "md5-dos2unix"
    stage: str
    role: str  # "out" | "dep"


def read_lock(root: Path) -> dict[str, dict]:
    lock = root / "dvc.lock"
    if not lock.exists():
        raise LineageError(f"{lock}: missing; run the pipeline first (distillery run <recipe>, or dvc repro)")
    return (yaml.safe_load(lock.read_text()) or {}).get("stages", {})


def _record(item: dict, stage: str, role: str) -> Record | None:
    if "md5" not in item:
        return None
    return Record(item["path"], item["md5"], "md5" if item.get("hash") == "md5" else "md5-dos2unix", stage, role)


def lock_records(lock: dict[str, dict]) -> list[Record]:
    """Every dep and out of every stage, in dvc.lock's order."""
    out = []
    for stage, entry in lock.items():
        for role in ("deps", "outs"):
            out += [r for item in entry.get(role, []) if (r := _record(item, stage, role[:-1]))]
    return out


def producer(lock: dict[str, dict], path: str) -> Record | None:
    """The out record of the stage that wrote `path`: the file itself, or the folder holding it."""
    for rec in lock_records(lock):
        if rec.role == "out" and (path == rec.path or path.startswith(rec.path.rstrip("/") + "/")):
            return rec
    return None


def relative(root: Path, target: str | Path) -> str:
    """`target` as the project-relative POSIX path that dvc.lock uses."""
    p = Path(target)
    if p.is_absolute():
        try:
            p = p.resolve().relative_to(root.resolve())
        except ValueError:
            raise LineageError(f"{target}: outside the project {root}") from None
    return Path(os.path.normpath(p)).as_posix()


# --- MLflow: the run that executed a stage -----------------------------------------------------

def mlflow_available(root: Path) -> bool:
    """Point MLflow at the project's store; False when there is no store to read (never creates one)."""
    from distillery.core import tracking
    tracking.quiet_telemetry()
    import mlflow
    uri = tracking.tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists()


def find_run(out_path: str, md5: str) -> dict | None:
    """The latest MLflow run whose `dvc.outs.<out_path>` tag is `md5`: the run that wrote that version."""
    import mlflow
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=1,
                              filter_string=f"tags.`dvc.outs.{out_path}` = '{md5}'",
                              order_by=["attributes.start_time DESC"])
    if not runs:
        return None
    run = runs[0]
    tags = run.data.tags
    info = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "status": run.info.status,
            "start_time": run.info.start_time, "git_commit": tags.get("git.commit"),
            "parent_run_id": tags.get("mlflow.parentRunId")}
    if info["parent_run_id"]:
        parent = mlflow.get_run(info["parent_run_id"]).data.tags
        info["recipe"] = parent.get("distillery.recipe")
        info["prefect_flow_run_id"] = parent.get("prefect.flow_run_id")
    return info


# --- the graph -------------------------------------------------------------------------------

def _kind(root: Path, path: str) -> str:
    p = root / path
    return "code" if p.suffix == ".py" or (p.is_dir() and any(p.rglob("*.py"))) else "data"


def _dir_manifest(root: Path, rec: Record) -> dict[str, str] | None:
    """{relative file: md5} of a folder version, from its `.dir` object in the DVC cache, if there."""
    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree
    with Repo(str(root)) as repo:
        odb = repo.cache.local if rec.hash_name == "md5" else repo.cache.legacy
        try:
            tree = Tree.load(odb, HashInfo(rec.hash_name, rec.md5))
        except (FileNotFoundError, ValueError):
            return None
    return {"/".join(key): hi.value for key, _, hi in tree}


def trace(root: Path | str, target: str, runs: bool = True) -> dict:
    """The lineage graph of `target`: every artifact and stage upstream of it, with md5s and runs.

    Returns {"target", "md5", "artifacts": {path: {md5, kind, stage, within}},
    "stages": {name: {cmd, params, deps: {path: md5}, outs: {path: md5}, run}}}. A dep's md5 is the
    one its consumer recorded; `stale` lists deps whose producer has since written another version.
    """
    root = Path(root).resolve()
    lock = read_lock(root)
    path = relative(root, target)
    with_runs = runs and mlflow_available(root)
    made_by = producer(lock, path)
    md5 = None
    if made_by and made_by.path == path:
        md5 = made_by.md5
    elif made_by:  # a file inside a stage's output folder: its md5 is in the folder's manifest
        md5 = (_dir_manifest(root, made_by) or {}).get(path[len(made_by.path.rstrip('/')) + 1:])
    if md5 is None:
        md5 = next((r.md5 for r in lock_records(lock) if r.path == path), None)
    if md5 is None and made_by is None:
        raise LineageError(f"{path}: not recorded in {root / 'dvc.lock'}: no stage that has run reads or writes it "
                           "(check the path against dvc.yaml's deps and outs, or run the stage that writes it)")
    graph = {"target": path, "md5": md5, "artifacts": {}, "stages": {}, "stale": []}

    def visit(p: str, md5: str | None) -> None:
        rec = producer(lock, p)
        graph["artifacts"][p] = {"md5": md5, "kind": "output" if rec else _kind(root, p),
                                 "stage": rec.stage if rec else None,
                                 "within": rec.path if rec and rec.path != p else None}
        if rec is None:
            return
        if rec.path == p and md5 is not None and md5 != rec.md5:
            graph["stale"].append({"path": p, "consumed": md5, "written": rec.md5, "stage": rec.stage})
        if rec.stage in graph["stages"]:
            return
        entry = lock[rec.stage]
        params = {k: v for f in (entry.get("params") or {}).values() for k, v in flatten(f).items()}
        deps = {d["path"]: d.get("md5") for d in entry.get("deps", [])}
        stage = {"cmd": entry.get("cmd"), "params": params, "deps": deps,
                 "outs": {o["path"]: o.get("md5") for o in entry.get("outs", [])},
                 "run": find_run(rec.path, rec.md5) if with_runs else None}
        graph["stages"][rec.stage] = stage
        for dep, dep_md5 in deps.items():
            visit(dep, dep_md5)

    visit(path, md5)
    return graph


def render(graph: dict) -> str:
    """The graph as a tree from the target down; a stage reached twice is shown once."""
    lines: list[str] = []
    shown: set[str] = set()
    if "registered" in graph:
        reg = graph["registered"]
        lines.append(f"registered model {reg['name']} version {reg['version']} -> {graph['target']}")
        if "note" in reg:
            lines.append(f"note: {reg['note']}")

    def stage_lines(name: str, indent: str) -> None:
        if name in shown:
            lines.append(f"{indent}└── stage {name} (shown above)")
            return
        shown.add(name)
        stage = graph["stages"][name]
        lines.append(f"{indent}└── stage {name}: {stage['cmd']}")
        pad = indent + "    "
        if stage["params"]:
            lines.append(f"{pad}params: " + ", ".join(f"{k}={v}" for k, v in stage["params"].items()))
        run = stage["run"]
        if run:
            via = f", pipeline run {run['parent_run_id']} ({run.get('recipe') or '?'})" if run["parent_run_id"] else ""
            lines.append(f"{pad}MLflow run {run['run_id']}{via}, git {run['git_commit'] or 'unknown'}")
        else:
            lines.append(f"{pad}MLflow run: none recorded this version (run outside the flow, "
                         "restored from DVC's run-cache, or MLflow not reachable)")
        deps = list(stage["deps"].items())
        for i, (dep, md5) in enumerate(deps):
            last = i == len(deps) - 1
            art = graph["artifacts"][dep]
            what = f"in {art['within']}" if art["within"] else art["kind"]
            lines.append(f"{pad}{'└' if last else '├'}── {dep}  md5 {md5}  ({what})")
            if art["stage"]:
                stage_lines(art["stage"], pad + ("    " if last else "│   "))

    target = graph["artifacts"][graph["target"]]
    head = f"{graph['target']}  md5 {graph['md5'] or '?'}"
    if target["stage"]:
        lines.append(head + (f"  (in {target['within']})" if target["within"] else ""))
        stage_lines(target["stage"], "")
    else:
        lines.append(head + f"  ({target['kind']}: not written by any stage)")
    for s in graph["stale"]:
        lines.append(f"stale: {s['path']} was consumed as {s['consumed']} but {s['stage']} has since written "
                     f"{s['written']}; `dvc repro` brings the chain up to date")
    return "\n".join(lines)


# --- registered models ---------------------------------------------------------------------

def resolve(root: Path, target: str) -> tuple[str, dict | None]:
    """A project path for `target`: a path, or a registered model (`models:/name/3`, `models:/name@alias`,
    `name`, `name/3`, `name@alias`) resolved through its version's `dvc.path` tag."""
    root = root.resolve()
    if not target.startswith("models:/"):
        path = relative(root, target)
        recorded = (root / "dvc.lock").exists() and any(r.path == path for r in lock_records(read_lock(root)))
        if (root / path).exists() or recorded:
            return path, None
    if not mlflow_available(root):
        raise LineageError(f"{target}: no such file, and no MLflow store at {root / 'mlflow.db'} to look a model up in")
    import mlflow
    from mlflow.exceptions import MlflowException
    client = mlflow.MlflowClient()
    ref = target.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, version = ref.rsplit("/", 1)
            mv = client.get_model_version(name, version)
        else:
            try:
                mv = client.get_model_version_by_alias(ref, "champion")
            except MlflowException:
                versions = client.search_model_versions(f"name = '{ref}'", order_by=["version_number DESC"], max_results=1)
                if not versions:
                    raise
                mv = versions[0]
    except MlflowException:
        raise LineageError(f"{target}: neither a file in the project nor a registered model version "
                           "(models:/name/version, models:/name@alias or a model name)") from None
    if TAG_PATH not in mv.tags:
        raise LineageError(f"{target}: model version {mv.name}/{mv.version} has no {TAG_PATH!r} tag; "
                           "it was not registered by `distillery register`")
    info = {"name": mv.name, "version": mv.version, "md5": mv.tags.get(TAG_MD5), "tags": dict(mv.tags)}
    return mv.tags[TAG_PATH], info


def lineage(root: Path | str, target: str) -> dict:
    """`trace` for a path or a registered model; a model whose md5 differs from dvc.lock's is flagged."""
    root = Path(root).resolve()
    path, version = resolve(root, target)
    graph = trace(root, path)
    if version:
        graph["registered"] = version
        if version["md5"] and version["md5"] != graph["md5"]:
            graph["registered"]["note"] = (f"version {version['version']} is md5 {version['md5']} but dvc.lock now records "
                                           f"{graph['md5']}: the chain below is that of the current file")
    return graph


# --- verification ----------------------------------------------------------------------------

def _chain_records(lock: dict[str, dict], graph: dict) -> list[Record]:
    made_by = producer(lock, graph["target"])
    if made_by:
        recs = [Record(graph["target"], graph["md5"], made_by.hash_name, made_by.stage, "out")]
    else:  # a source (raw data, code): as the stages that read it recorded it
        recs = [r for r in lock_records(lock) if r.path == graph["target"]]
    for name in graph["stages"]:
        recs += [r for item in lock[name].get("deps", []) if (r := _record(item, name, "dep"))]
    return [r for r in recs if r.md5]


def verify(root: Path | str, target: str | None = None) -> tuple[int, list[str]]:
    """Re-hash every artifact in `target`'s chain (everything in dvc.lock without one).

    Returns (artifacts checked, problems); each problem names the file that is missing or whose
    md5 differs from dvc.lock, and for a folder the file inside it when DVC's cache has its manifest.
    """
    from dvc.repo import Repo
    from dvc_data.hashfile.build import build
    root = Path(root).resolve()
    lock = read_lock(root)
    if target is None:
        records = lock_records(lock)
    else:
        path, version = resolve(root, target)
        graph = trace(root, path, runs=False)
        records = _chain_records(lock, graph)
        if version and version["md5"]:
            records.insert(0, Record(path, version["md5"], "md5", f"registry {version['name']}/{version['version']}", "out"))
    problems: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    with Repo(str(root)) as repo:
        for rec in records:
            if (rec.path, rec.md5) in seen:
                continue
            seen.add((rec.path, rec.md5))
            where = f"{rec.role} of {rec.stage}" if not rec.stage.startswith("registry") else rec.stage
            full = root / rec.path
            if not full.exists():
                problems.setdefault(rec.path, f"{rec.path}: missing (dvc.lock: md5 {rec.md5}, {where}); "
                                              f"`dvc checkout {rec.path}` restores it from the cache, or re-run its stage")
                continue
            odb = repo.cache.local if rec.hash_name == "md5" else repo.cache.legacy
            _, _, obj = build(odb, str(full), repo.fs, rec.hash_name, dry_run=True, ignore=repo.dvcignore)
            actual = obj.hash_info.value
            if actual == rec.md5:
                continue
            if not rec.md5.endswith(".dir"):
                problems.setdefault(rec.path, f"{rec.path}: md5 {actual} does not match dvc.lock ({rec.md5}, {where})")
                continue
            recorded = _dir_manifest(root, rec) if full.is_dir() else None
            if recorded is None:
                problems.setdefault(rec.path, f"{rec.path}: folder md5 {actual} does not match dvc.lock ({rec.md5}, "
                                              f"{where}); its file list is not in the DVC cache, so the changed file "
                                              "cannot be named (`dvc diff` may)")
                continue
            current = {"/".join(key): hi.value for key, _, hi in obj}
            for name in sorted(recorded.keys() | current.keys()):
                file = f"{rec.path.rstrip('/')}/{name}"
                if name not in current:
                    problems.setdefault(file, f"{file}: missing (listed in {rec.path} as md5 {recorded[name]}, {where})")
                elif name not in recorded:
                    problems.setdefault(file, f"{file}: not in dvc.lock's version of {rec.path} ({where}): added since")
                elif current[name] != recorded[name]:
                    problems.setdefault(file, f"{file}: md5 {current[name]} does not match dvc.lock ({recorded[name]}, "
                                              f"file in {rec.path}, {where})")
    return len(seen), list(problems.values())


def to_json(graph: dict) -> str:
    return json.dumps(graph, indent=2, sort_keys=False, default=str)
