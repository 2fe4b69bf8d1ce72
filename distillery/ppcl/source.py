"""Which model PPCL prunes and the inputs it calibrates on, as files a stage hands to the next.

The teacher folder holds `source.json`: `kind` (`digits` / `text`: trained here, `folder`: the user's
`save_pretrained` folder, read in place), `path` and `subfolder` of the `save_pretrained` folder, the
class and, for a user's folder, the md5 of each of its files. The inputs file holds the seeded
calibration subset and the held-out inputs (`ModelInputs`) with their md5 and where they came from.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from distillery.core.artifacts import atomic_path, load_artifact, write_json
from distillery.core.errors import ArtifactError
from distillery.ppcl.capture import ModelInputs

SOURCE = "source.json"


def file_md5s(folder: Path) -> dict[str, str]:
    out = {}
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file():
            h = hashlib.md5()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[str(f.relative_to(folder))] = h.hexdigest()
    return out


def write_source(folder: Path, info: dict) -> None:
    write_json(Path(folder) / SOURCE, info)


def read_source(folder: Path) -> dict:
    path = Path(folder) / SOURCE
    if not path.exists():
        raise ArtifactError(f"{path}: missing; run the ppcl_teacher stage (dvc repro ppcl_teacher)")
    return json.loads(path.read_text())


def load_teacher(folder: Path, root: Path | str | None = None) -> tuple[nn.Module, dict]:
    """The teacher `source.json` in `folder` names, loaded as its library loads it, and that record.

    A relative `path` in `source.json` is the project's (relative to the root the stage ran in): `root`, when
    given, resolves it, for a process whose working directory is another (a Dask worker's)."""
    from distillery.ppcl.hf import load_pretrained
    info = read_source(folder)
    path = Path(info["path"])
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    return load_pretrained(path, info.get("subfolder")), info


def save_inputs_file(path: Path, calibration: ModelInputs, heldout: ModelInputs, info: dict) -> None:
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        torch.save({"calibration": calibration.state(), "heldout": heldout.state(), "info": info}, f)


def load_inputs_file(path: Path) -> tuple[ModelInputs, ModelInputs, dict]:
    """(calibration, held-out, info) of the ppcl_teacher stage's inputs file."""
    raw = load_artifact(path, "inputs", "ppcl_teacher")
    return (ModelInputs(raw["calibration"]["batched"], raw["calibration"]["static"]),
            ModelInputs(raw["heldout"]["batched"], raw["heldout"]["static"]), raw["info"])
