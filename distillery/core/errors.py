"""User-facing errors, and the entry point that turns them into one clear line and exit code 2."""
from __future__ import annotations

import os
import sys
from typing import Callable


class DistilleryError(ValueError):
    """A problem the user can fix (bad params, a bad file); its message names the fix."""


class ParamsError(DistilleryError):
    """A `params.yaml` problem."""


class DataError(DistilleryError):
    """A data file or folder that cannot be used."""


class ArtifactError(DistilleryError):
    """An artifact (checkpoint, ONNX model) that is missing, truncated or corrupt."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's `main`, printing user errors without a traceback unless DISTILLERY_DEBUG=1."""
    try:
        main()
    except DistilleryError as err:
        if os.environ.get("DISTILLERY_DEBUG") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
