"""The `distillery` command: runs the project's command line (`flows/cli.py`) from the project root.

The flows and stages belong to a Distillery project (a folder with `dvc.yaml`, `tasks/` and
`flows/`), not to the installed library, so this entry point finds the project from the current
directory upwards, as `git` and `dvc` find theirs, and runs `python -m flows.cli` there.
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


def main() -> None:
    root = project_root(Path.cwd())
    if root is None:
        print(f"error: {Path.cwd()} is not inside a Distillery project (no dvc.yaml with flows/cli.py here or "
              "above); cd into the project folder", file=sys.stderr)
        sys.exit(2)
    os.chdir(root)
    os.execv(sys.executable, [sys.executable, "-m", "flows.cli", *sys.argv[1:]])
