"""The `distillery` command: runs the project's command line (`flows/cli.py`).

The flows and stages belong to a Distillery project (a folder with `dvc.yaml`, `tasks/` and
`flows/`), not to the installed library. This entry point finds the project's code (from `--root` when
given, then from the current directory, upwards, as `git` and `dvc` find theirs) and runs
`python -m flows.cli` with the project on `PYTHONPATH`, in the caller's directory, so relative
paths in the arguments mean what they meant to the caller.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def project_root(start: Path) -> Path | None:
    """The nearest folder at or above `start` that holds `dvc.yaml` and `flows/cli.py`."""
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "flows" / "cli.py").is_file():
            return folder
    return None


def root_argument(args: list[str]) -> Path | None:
    """The value of `--root` in `args`, if any."""
    for i, arg in enumerate(args):
        if arg == "--root" and i + 1 < len(args):
            return Path(args[i + 1])
        if arg.startswith("--root="):
            return Path(arg.removeprefix("--root="))
    return None


def main() -> None:
    args = sys.argv[1:]
    starts = [p.resolve() for p in (root_argument(args), Path.cwd()) if p is not None]
    root = next((r for r in map(project_root, starts) if r is not None), None)
    if root is None:
        print(f"error: {starts[0]} is not inside a Distillery project (no dvc.yaml with flows/cli.py there or above); "
              "cd into the project folder or pass --root", file=sys.stderr)
        sys.exit(2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
           "DISTILLERY_ROOT": str(root)}  # the default --root of flows/cli.py; an explicit --root wins
    os.execve(sys.executable, [sys.executable, "-m", "flows.cli", *args], env)
