"""The model registry: every deployed model of a recipe as a version of `distillery-<recipe>`.

Each version carries its lineage as tags (the file and its DVC md5, the stage and MLflow run that
wrote it, the pipeline run that registered it, the git commit) and its headline metrics. Aliases:
one per model name (`models:/distillery-pqd@distilled`) and `champion`, set by one declared rule:

    the fastest model (p50 latency, batch 1, one thread) whose accuracy is within
    CHAMPION_TOLERANCE (one percentage point) of the teacher's.

A file already registered with the same md5 gets no new version: its tags are refreshed instead,
so re-running an unchanged pipeline leaves the registry as it was.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from distillery.core.errors import DistilleryError
from flows.lineage import TAG_MD5, TAG_PATH, find_run, producer, read_lock
from tasks.paths import DEPLOYED, metrics

ACCURACY = metrics("evaluate")  # written by tasks/evaluate.py: {model: {"accuracy": ..}}
LATENCY = metrics("benchmark")  # written by tasks/benchmark.py: {"models": {model: {"threads_1": ..}}}
REGISTERED = {"pqd": DEPLOYED}  # recipe -> the deployed models it registers; other recipes register none
TEACHER = "teacher"  # the baseline every speed-up is measured against (tasks.benchmark.BASELINE)
CHAMPION = "champion"
CHAMPION_TOLERANCE = 0.01  # accuracy is in [0, 1]: one percentage point
CHAMPION_RULE = (f"fastest p50 latency at 1 thread among the models within {100 * CHAMPION_TOLERANCE:g} "
                 f"point(s) of the teacher's accuracy")


class RegistryError(DistilleryError):
    """Metrics or artifacts missing for a registration."""


@dataclass(frozen=True)
class Headline:
    """The figures a version is tagged with (and the champion is chosen by)."""
    accuracy: float
    p50_ms_1t: float | None
    p50_ms_all: float | None
    speedup_1t: float | None
    size_bytes: int | None

    def tags(self) -> dict[str, str]:
        values = {"accuracy": self.accuracy, "latency.p50_ms.threads_1": self.p50_ms_1t,
                  "latency.p50_ms.threads_all": self.p50_ms_all, "speedup_p50.threads_1": self.speedup_1t,
                  "size_bytes": self.size_bytes}
        return {f"metrics.{k}": repr(v) for k, v in values.items() if v is not None}


def registered_name(recipe: str) -> str:
    return f"distillery-{recipe}"


def headlines(accuracy: dict, latency: dict) -> dict[str, Headline]:
    """One Headline per model present in both metrics files."""
    out = {}
    for name, acc in accuracy.items():
        bench = latency.get("models", {}).get(name)
        if bench is None:
            continue
        one, every = bench.get("threads_1", {}), bench.get("threads_all", {})
        out[name] = Headline(float(acc["accuracy"]), one.get("p50_ms"), every.get("p50_ms"), one.get("speedup_p50"),
                             bench.get("size_bytes"))
    return out


def pick_champion(figures: dict[str, Headline], teacher: str = TEACHER,
                  tolerance: float = CHAMPION_TOLERANCE) -> str | None:
    """The rule: fastest at one thread among models no more than `tolerance` below the teacher."""
    if teacher not in figures:
        return None
    floor = figures[teacher].accuracy - tolerance - 1e-12  # 1e-12: exactly one point below still qualifies
    eligible = [(h.p50_ms_1t, -h.accuracy, name) for name, h in figures.items()
                if h.p50_ms_1t is not None and h.accuracy >= floor]
    return min(eligible)[2] if eligible else None


def alias_for(model: str) -> str:
    """A model name as a registry alias (letters, digits, _ and -; never `latest` or `v<n>`)."""
    alias = re.sub(r"[^\w-]", "-", model)
    return f"model-{alias}" if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias) else alias


@dataclass(frozen=True)
class Registration:
    registered_model: str
    versions: dict[str, str]  # model -> version
    champion: str | None


def _logged_model_uri(run_id: str, model: str) -> str | None:
    """The MLflow model the producing stage logged for this file (distillery.core.tracking.log_onnx_model), if any."""
    import mlflow
    run = mlflow.get_run(run_id)
    found = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                        filter_string=f"source_run_id = '{run_id}' AND name = '{model}'")
    return found[0].model_uri if found else None


def _log_model(path: Path, model: str, run_id: str | None) -> str:
    """Log the ONNX file as an MLflow model of the pipeline run (stages that log none, or runs outside the flow)."""
    from importlib.metadata import version

    import mlflow
    import onnx

    def log() -> str:  # requirements given: MLflow's inference loads the model in a subprocess, seconds each
        requirements = [f"onnx=={version('onnx')}", f"onnxruntime=={version('onnxruntime')}"]
        return mlflow.onnx.log_model(onnx.load(str(path)), name=model, pip_requirements=requirements).model_uri

    active = mlflow.active_run()
    if active and (run_id is None or active.info.run_id == run_id):
        return log()
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "register",
                          tags=None if run_id else {"distillery.kind": "registry"}, nested=active is not None):
        return log()


def register(recipe: str, root: Path | str, models: dict[str, Path | str], figures: dict[str, Headline],
             parent_run_id: str | None = None) -> Registration:
    """Register (or refresh) one version per model file; move the per-model aliases and `champion`."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
    from distillery.core import tracking
    root = Path(root).resolve()
    tracking.init_mlflow(root)
    lock = read_lock(root)
    missing = [m for m in models if m not in figures]
    if missing:
        raise RegistryError(f"no accuracy and latency for {', '.join(missing)} in {ACCURACY} / {LATENCY}; "
                            "run the recipe's evaluate and benchmark stages first")
    client = mlflow.MlflowClient()
    name = registered_name(recipe)
    try:
        client.create_registered_model(name, tags={"distillery.recipe": recipe, "champion.rule": CHAMPION_RULE},
                                       description=f"Deployed models of the {recipe} recipe. `champion`: {CHAMPION_RULE}.")
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    existing = client.search_model_versions(f"name = '{name}'")
    versions = {}
    for model, rel in models.items():
        path = Path(rel).as_posix()
        rec = producer(lock, path)
        if rec is None or rec.path != path:
            raise RegistryError(f"{path}: not an out of any stage in dvc.lock; only DVC-versioned files are registered")
        if not (root / path).exists():
            raise RegistryError(f"{path}: missing; `dvc checkout {path}` or re-run {rec.stage}")
        run = find_run(rec.path, rec.md5)
        commit = (run or {}).get("git_commit") or tracking.git_commit(root)
        tags = {"distillery.model": model, "distillery.recipe": recipe, TAG_PATH: path, TAG_MD5: rec.md5,
                "distillery.stage": rec.stage, "distillery.producing_run_id": (run or {}).get("run_id", "unknown"),
                "distillery.parent_run_id": parent_run_id or "none", "git.commit": commit,
                **figures[model].tags()}
        same = [v for v in existing if v.tags.get(TAG_MD5) == rec.md5 and v.tags.get("distillery.model") == model]
        if same:
            version = max(same, key=lambda v: int(v.version)).version
            for key, value in tags.items():
                client.set_model_version_tag(name, version, key, value)
        else:
            uri = _logged_model_uri(run["run_id"], model) if run else None
            uri = uri or _log_model(root / path, model, parent_run_id)
            version = mlflow.register_model(uri, name, tags=tags).version
            client.update_model_version(name, version, description=f"{model} ({recipe}): {path}, md5 {rec.md5}, "
                                                                   f"written by stage {rec.stage}")
        versions[model] = str(version)
        client.set_registered_model_alias(name, alias_for(model), version)
    champion = pick_champion({m: figures[m] for m in models})
    if champion:
        client.set_registered_model_alias(name, CHAMPION, versions[champion])
        if parent_run_id:
            client.set_tag(parent_run_id, "distillery.champion", f"{champion} ({name} v{versions[champion]})")
    return Registration(name, versions, champion)


def register_models(recipe: str, root: Path | str = ".", parent_run_id: str | None = None,
                    models: dict[str, Path | str] | None = None) -> Registration:
    """Register every deployed model of `recipe` from the project's metrics files (the pipeline's last step)."""
    root = Path(root).resolve()
    if recipe not in REGISTERED:
        raise RegistryError(f"recipe {recipe!r} deploys no models to register; registered recipes: "
                            f"{', '.join(REGISTERED)}")
    if models is None:
        models = REGISTERED[recipe]
    files = {}
    for rel in (ACCURACY, LATENCY):
        if not (root / rel).exists():
            raise RegistryError(f"{root / rel}: missing; run the {recipe} recipe (distillery run {recipe}) first")
        files[rel] = json.loads((root / rel).read_text())
    figures = headlines(files[ACCURACY], files[LATENCY])
    return register(recipe, root, models, figures, parent_run_id)
