"""Schedules: each recipe as a Prefect deployment of `flows.pipeline.pipeline`, timed by schedules.yaml.

Two ways to run them, neither needs docker, both need a Prefect server in PREFECT_API_URL:

- `distillery serve`: one long-lived local process registers every deployment and executes their
  runs itself (`prefect.serve`), one at a time. Stop it and the schedules pause.
- `distillery deploy`: registers the deployments on a process work pool, the code taken from this
  folder (`flow.from_source`); `prefect worker start --pool <work_pool>` processes execute the runs.
"""
from __future__ import annotations

import datetime
import zoneinfo
from pathlib import Path
from typing import Any, Iterable
from uuid import UUID

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distillery.core.errors import DistilleryError

SCHEDULES = Path("schedules.yaml")
ENTRYPOINT = "flows/pipeline.py:pipeline"  # relative to the project root: the code a worker runs
START_SERVER = "prefect server start --host 127.0.0.1"


class ScheduleError(DistilleryError):
    """A bad schedules.yaml, or no Prefect server to register with."""


def _valid_timezone(v: str | None) -> str | None:
    if v is not None:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {v!r}; use an IANA name such as UTC or Europe/Berlin") from None
    return v


class PipelineSchedule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cron: list[str] = Field(default_factory=list)  # one or more cron expressions
    interval: float | None = Field(None, gt=0)  # seconds: for a period cron cannot express
    timezone: str | None = None  # default: the file's `timezone`
    active: bool = True  # false: registered, but its schedule paused
    parameters: dict[str, Any] = Field(default_factory=dict)  # extra flow parameters

    @field_validator("cron", mode="before")
    @classmethod
    def _crons(cls, v: Any) -> Any:
        from prefect.client.schemas.schedules import CronSchedule
        crons = [v] if isinstance(v, str) else v
        for expr in crons or []:
            try:
                CronSchedule(cron=expr)
            except (ValidationError, ValueError):
                raise ValueError(f"{expr!r} is not a cron expression (minute hour day-of-month month day-of-week, "
                                 "e.g. '0 2 * * *' for 02:00 every day)") from None
        return crons

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str | None) -> str | None:
        return _valid_timezone(v)

    @model_validator(mode="after")
    def _one_kind(self) -> "PipelineSchedule":
        if not self.cron and self.interval is None:
            raise ValueError("give `cron` (e.g. '0 2 * * *') or `interval` (seconds)")
        if {"recipe", "root"} & self.parameters.keys():
            raise ValueError("`recipe` and `root` are set by distillery, not in `parameters`")
        return self


class SchedulesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    timezone: str = "UTC"
    work_pool: str = "distillery"  # the process work pool `distillery deploy` registers on
    pipelines: dict[str, PipelineSchedule]

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        return _valid_timezone(v)


def parse_schedules(raw: Any, recipes: Iterable[str], source: str = str(SCHEDULES)) -> SchedulesConfig:
    """Validate a schedules mapping; every error names its key, the value and what is allowed."""
    try:
        config = SchedulesConfig.model_validate(raw if raw is not None else {})
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
            value = "" if e["type"] in ("missing", "extra_forbidden") else f" = {e['input']!r}"
            lines.append(f"{source}: {loc}{value}: {msg}")
        raise ScheduleError("\n".join(lines)) from None
    unknown = sorted(set(config.pipelines) - set(recipes))
    if unknown:
        raise ScheduleError(f"{source}: pipelines {', '.join(unknown)}: no such recipe; recipes: {', '.join(sorted(recipes))}")
    return config


def load_schedules(path: Path | str = SCHEDULES, recipes: Iterable[str] | None = None) -> SchedulesConfig:
    path = Path(path)
    if not path.exists():
        raise ScheduleError(f"{path}: not found; it lists a cron schedule per recipe (see README, Operations)")
    if recipes is None:
        from flows.pipeline import PIPELINES as recipes
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ScheduleError(f"{path}: not valid YAML: {err}") from None
    return parse_schedules(raw, recipes, str(path))


def prefect_schedules(entry: PipelineSchedule, timezone: str) -> list:
    from prefect.schedules import Cron, Interval
    tz = entry.timezone or timezone
    out = [Cron(expr, timezone=tz, active=entry.active) for expr in entry.cron]
    if entry.interval is not None:
        out.append(Interval(datetime.timedelta(seconds=entry.interval), timezone=tz, active=entry.active))
    return out


def deployments(config: SchedulesConfig, root: Path, flow=None) -> list:
    """One RunnerDeployment per recipe, named after it, with its schedules and `root` fixed to this project."""
    if flow is None:
        from flows.pipeline import pipeline as flow
    return [flow.to_deployment(name=recipe, schedules=prefect_schedules(entry, config.timezone),
                               parameters={"recipe": recipe, "root": str(root.resolve()), **entry.parameters},
                               tags=["distillery", recipe], description=f"distillery recipe {recipe}")
            for recipe, entry in config.pipelines.items()]


def require_server() -> str:
    """The Prefect API URL, checked to answer; a clear error when unset or down."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    url = PREFECT_API_URL.value()
    if not url:
        raise ScheduleError("PREFECT_API_URL is not set: schedules live on a Prefect server. Start one with "
                            f"`{START_SERVER}` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    with get_client(sync_client=True) as client:
        err = client.api_healthcheck()
    if err is not None:
        raise ScheduleError(f"no Prefect server answers at PREFECT_API_URL={url} ({type(err).__name__}); "
                            f"start one with `{START_SERVER}`")
    return url


def ensure_work_pool(name: str) -> None:
    """Create the process work pool if the server has none of that name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))


def deploy(config: SchedulesConfig, root: Path) -> list[UUID]:
    """Register every recipe's deployment on the process work pool; returns their ids."""
    import prefect
    from prefect import Flow
    require_server()
    ensure_work_pool(config.work_pool)
    flow = Flow.from_source(source=str(root.resolve()), entrypoint=ENTRYPOINT)
    return prefect.deploy(*deployments(config, root, flow), work_pool_name=config.work_pool, build=False, push=False,
                          print_next_steps_message=False, ignore_warnings=True)


def serve(config: SchedulesConfig, root: Path, flow=None) -> None:
    """Register every deployment and execute its runs in this process, one at a time, until stopped."""
    import prefect
    require_server()
    prefect.serve(*deployments(config, root, flow), limit=1)
