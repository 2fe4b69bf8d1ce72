"""The `distillery` command line: validate first, then hand over to a Prefect flow."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from tasks.errors import DistilleryError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress PyTorch models for CPU deployment, reproducibly.")
RECIPES = ("pqd",)


def embedded_defaults(root: Path) -> None:
    """Local state lives in the project; telemetry off. Set before prefect or mlflow is imported."""
    from tasks.tracking import quiet_telemetry
    quiet_telemetry()
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


def fail(err: Exception, debug: bool) -> None:
    if debug:
        raise err
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


@app.command()
def validate(params: Path = typer.Option(Path("params.yaml"), help="params file to check")) -> None:
    """Check every params.yaml section; print what is wrong, or nothing."""
    from tasks.config import load_params
    try:
        load_params(params)
    except DistilleryError as err:
        fail(err, debug=False)
    typer.echo(f"{params}: ok")


@app.command()
def run(recipe: str = typer.Argument(..., help=f"one of: {', '.join(RECIPES)}"),
        root: Path = typer.Option(Path("."), help="project folder (holds dvc.yaml and params.yaml)"),
        debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    """Run a recipe as a Prefect flow over its DVC stages; unchanged stages are skipped."""
    from tasks.config import load_params
    root = root.resolve()
    os.chdir(root)  # params paths are relative to the project, as in DVC's stage commands
    try:
        if recipe not in RECIPES:
            raise DistilleryError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
        load_params(root / "params.yaml")  # before Prefect's start-up: bad params cost no time
    except DistilleryError as err:
        fail(err, debug)
    embedded_defaults(root)
    if debug:
        os.environ["DISTILLERY_DEBUG"] = "1"
    from flows.pipeline import pipeline, project_lock
    try:
        with project_lock(root):
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


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
