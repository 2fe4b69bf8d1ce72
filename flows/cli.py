"""The `distillery` command line: validate first, then hand over to a Prefect flow."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from distillery.core.errors import DistilleryError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress PyTorch models for CPU deployment, reproducibly.")
RECIPES = ("pqd", "ablation", "ppcl")
ROOT_ENV = "DISTILLERY_ROOT"  # the project the `distillery` command found: the default --root


def embedded_defaults(root: Path) -> None:
    """Local state lives in the project; telemetry off. Set before prefect or mlflow is imported."""
    from distillery.core.tracking import quiet_telemetry
    quiet_telemetry()
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_API_HOST", "127.0.0.1")  # the temporary server stays private
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # 20 s is too short on a busy 2-core box
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


def check_params(path: Path, recipe: str | None = None) -> dict:
    """Every section of `path` validated, the raw data readable, and the model built with its weights and
    run on one batch of the data's shape, its outputs against the data's classes; nothing written."""
    from distillery.core.params import load_params
    from distillery.data import check_source
    configs = load_params(path)
    prep, train = configs["prepare"], configs["train"]
    data = check_source(prep.source, prep.path, test_path=prep.test_path, grayscale=prep.grayscale,
                        normalize=prep.normalize)
    check_model(train, data, prep.image_size, qat=configs["quantize"].method == "qat")
    if recipe in (None, "ppcl"):  # `validate` checks everything; a pqd run does not stop for a PPCL folder
        check_ppcl(configs["ppcl_teacher"])
    return configs


def check_ppcl(cfg) -> None:
    """PPCL's device exists here; a folder teacher holds a supported class and its inputs source exists."""
    from distillery.ppcl.hf import resolve_device
    resolve_device(cfg.device)
    if cfg.model in ("digits", "text"):
        return
    from distillery.core.errors import ParamsError
    from distillery.models.factory import is_factory, resolve
    from distillery.ppcl.hf import check_folder
    check_folder(cfg.model, cfg.subfolder)
    if is_factory(cfg.inputs):
        resolve(cfg.inputs, "ppcl_teacher.inputs")
    elif not Path(cfg.inputs).is_file():
        raise ParamsError(f"ppcl_teacher.inputs = {cfg.inputs!r}: file not found; record one with "
                          "distillery.ppcl.capture (with capture(model) as rec: ...; rec.save(path)) or give file.py:function")


def notes(configs: dict) -> list[str]:
    """Valid but probably unintended settings, said before the run."""
    prep, train = configs["prepare"], configs["train"]
    lines = []
    if train.weights is not None and prep.normalize == "dataset":
        lines.append("note: train.weights come with prepare.normalize = dataset (the train split's own mean and std); "
                     "if your network was trained with other values, give them as {mean: [...], std: [...]} "
                     "or none, or its measured accuracy will be off")
    return lines


def check_model(train, data: dict, image_size: int, qat: bool = True) -> None:
    """Build `train.model` (zoo or factory) with `train.weights`, run a batch shaped like the prepared data, and
    (for QAT) trace it as quantization-aware training will: a model fx cannot trace stops here, not at quantize."""
    import torch
    from distillery.models import build_teacher, check_classifier, model_spec
    channels = data.get("in_channels") or 3
    spec = model_spec(train.model, train.model_kwargs, channels, data["num_classes"], image_size)
    model = build_teacher(spec, train.weights)
    check_classifier(model, torch.zeros(2, channels, image_size, image_size), data["num_classes"], data.get("classes"))
    if qat:
        from distillery.compress.qat import trace
        trace(model.eval())


def fail(err: Exception, debug: bool) -> None:
    if debug:
        raise err
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


@app.command()
def validate(params: Path = typer.Option(None, help="params file to check [default: the project's params.yaml]")
             ) -> None:
    """Check every params.yaml section; print what is wrong, or nothing."""
    params = params or Path(os.environ.get(ROOT_ENV, ".")) / "params.yaml"
    try:
        path = params.resolve()
        if path.is_file():
            os.chdir(path.parent)  # paths in params.yaml are relative to its project, as DVC runs them
        configs = check_params(path)
        from flows.user_deps import sync
        pending = sync(path.parent, configs, write=False) if (path.parent / "dvc.yaml").is_file() else []
    except DistilleryError as err:
        fail(err, debug=False)
    for line in notes(configs) + [f"{line}  (pending: `distillery run` writes it)" for line in pending]:
        typer.echo(line)
    typer.echo(f"{params}: ok")


@app.command()
def params(section: str = typer.Argument(None, help="one section; all when left out"),
           path: Path = typer.Option(None, "--params", help="params file whose values to show "
                                                           "[default: the project's params.yaml]")) -> None:
    """Describe the params: every key's type, allowed range, description and its value in params.yaml."""
    import yaml
    from distillery.core.params import SECTIONS
    path = path or Path(os.environ.get(ROOT_ENV, ".")) / "params.yaml"
    values = yaml.safe_load(path.read_text()) if path.exists() else {}
    if section is not None and section not in SECTIONS:
        fail(DistilleryError(f"unknown section {section!r}; sections: {', '.join(SECTIONS)}"), debug=False)
    for name, schema in SECTIONS.items():
        if section not in (None, name):
            continue
        typer.echo(f"{name}:")
        for key, field in schema.model_fields.items():
            ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
            bounds = ", ".join(f"{ops[op]} {getattr(m, op)}" for m in field.metadata for op in ops if hasattr(m, op))
            section_values = values.get(name) or {}
            value = section_values[key] if key in section_values else \
                "<missing>" if field.is_required() else f"{field.default!r} (default)"
            shown = value if isinstance(value, str) and value.endswith("(default)") else repr(value)
            typer.echo(f"  {key} = {shown}    # {field.description}" + (f" [{bounds}]" if bounds else ""))


@app.command()
def run(recipe: str = typer.Argument(..., help=f"one of: {', '.join(RECIPES)}"),
        root: Path = typer.Option(Path("."), envvar=ROOT_ENV, help="project folder (holds dvc.yaml and params.yaml)"),
        debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    """Run a recipe as a Prefect flow over its DVC stages; unchanged stages are skipped."""
    root = root.resolve()
    os.chdir(root)  # params paths are relative to the project, as in DVC's stage commands
    try:
        if recipe not in RECIPES:
            raise DistilleryError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
        configs = check_params(root / "params.yaml", recipe)  # before Prefect's start-up: bad params cost no time
    except DistilleryError as err:
        fail(err, debug)
    for line in notes(configs):
        typer.echo(line)
    embedded_defaults(root)
    if debug:
        os.environ["DISTILLERY_DEBUG"] = "1"
    from flows.pipeline import pipeline, project_lock
    try:
        with project_lock(root):
            from flows.user_deps import sync
            for line in sync(root, configs):  # the files params.yaml names are deps of the stages that read them
                typer.echo(line)
            if recipe == "ablation":  # the six orders side by side, concurrently (flows/ablation.py)
                from flows.ablation import ablation_flow
                state = ablation_flow()(root=str(root), return_state=True)
            else:
                state = pipeline(recipe=recipe, root=str(root), return_state=True)
    except DistilleryError as err:
        fail(err, debug)
    if not state.is_completed():
        typer.secho(f"error: {recipe} failed: {state.message}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)
    outcome = state.result()
    executed = [s for s, o in outcome.items() if o == "executed"]
    typer.echo(f"{recipe}: executed {', '.join(executed) or 'nothing (all stages unchanged)'}; "
               f"reused {', '.join(s for s in outcome if s not in executed) or 'none'}")


ROOT_HELP = "project folder (holds dvc.yaml and dvc.lock)"


@app.command()
def lineage(target: str = typer.Argument(..., help="a project path, or a registered model: models:/name/3, "
                                                   "models:/name@champion, or a model name"),
            as_json: bool = typer.Option(False, "--json", help="print the lineage graph as JSON"),
            root: Path = typer.Option(Path("."), envvar=ROOT_ENV, help=ROOT_HELP),
            debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    """Print what produced an artifact: md5, stage, params, code and data deps down to the raw data, MLflow run, git commit."""
    from flows.lineage import lineage as trace_lineage, render, to_json
    try:
        graph = trace_lineage(root.resolve(), target)
    except DistilleryError as err:
        fail(err, debug)
    typer.echo(to_json(graph) if as_json else render(graph))


@app.command()
def verify(target: str = typer.Argument(None, help="a path or registered model; default: everything in dvc.lock"),
           root: Path = typer.Option(Path("."), envvar=ROOT_ENV, help=ROOT_HELP),
           debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    """Re-hash every artifact in a lineage chain; exit 1 naming each file that is missing or differs from dvc.lock."""
    from flows.lineage import verify as verify_chain
    try:
        checked, problems = verify_chain(root.resolve(), target)
    except DistilleryError as err:
        fail(err, debug)
    for problem in problems:
        typer.secho(f"FAILED {problem}", err=True, fg=typer.colors.RED)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"ok: {checked} artifacts match dvc.lock")


@app.command()
def register(recipe: str = typer.Argument(..., help=f"one of: {', '.join(RECIPES)}"),
             root: Path = typer.Option(Path("."), envvar=ROOT_ENV, help=ROOT_HELP),
             parent_run_id: str = typer.Option(None, help="the pipeline's MLflow run the registration belongs to"),
             debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    """Register the recipe's deployed models in MLflow's registry with lineage tags; move `champion` by its rule."""
    from flows.registry import CHAMPION_RULE, register_models
    try:
        done = register_models(recipe, root.resolve(), parent_run_id)
    except DistilleryError as err:
        fail(err, debug)
    for model, version in done.versions.items():
        typer.echo(f"{done.registered_model} v{version}: {model}" + ("  <- champion" if model == done.champion else ""))
    typer.echo(f"champion rule: {CHAMPION_RULE}")


@app.command()
def report(root: Path = typer.Option(Path("."), envvar=ROOT_ENV, help=ROOT_HELP),
           out: Path = typer.Option(Path("reports"), help="folder for summary.md, summary.csv, summary.png"),
           debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    """Every model of every run in MLflow: a table (markdown, CSV) and accuracy against latency with its Pareto front."""
    from flows.report import write_report
    try:
        paths = write_report(root.resolve(), out)
    except DistilleryError as err:
        fail(err, debug)
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@app.command()
def deploy(root: Path = typer.Option(Path("."), envvar=ROOT_ENV, help=ROOT_HELP),
           schedules: Path = typer.Option(Path("schedules.yaml"), help="cron schedule per recipe"),
           debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    """Register each recipe as a scheduled Prefect deployment on a process work pool (server in PREFECT_API_URL)."""
    root = root.resolve()
    embedded_defaults(root)
    from flows.deploy import deploy as deploy_all, load_schedules
    try:
        config = load_schedules(root / schedules)
        deploy_all(config, root)
    except DistilleryError as err:
        fail(err, debug)
    typer.echo(f"deployed {', '.join(config.pipelines)} on work pool {config.work_pool!r}; run them with "
               f"`prefect worker start --pool {config.work_pool}` (or use `distillery serve` instead)")


@app.command()
def serve(root: Path = typer.Option(Path("."), envvar=ROOT_ENV, help=ROOT_HELP),
          schedules: Path = typer.Option(Path("schedules.yaml"), help="cron schedule per recipe"),
          debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    """Serve every recipe's scheduled deployment from this one process until stopped (server in PREFECT_API_URL)."""
    root = root.resolve()
    os.chdir(root)
    embedded_defaults(root)
    from flows.deploy import load_schedules, serve as serve_all
    try:
        serve_all(load_schedules(root / schedules), root)
    except DistilleryError as err:
        fail(err, debug)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
