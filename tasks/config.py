"""Typed, frozen configs for every `params.yaml` section, validated before any work starts.

Each stage reads only its own section through `load_section`; the CLI validates every section at
once with `load_params` so that a typo stops the run before a single stage executes.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import yaml
from tasks.errors import ParamsError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PARAMS_FILE = Path("params.yaml")



class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class PrepareConfig(Section):
    source: Literal["digits", "npz", "imagefolder", "cifar", "idx"] = "digits"
    path: str | None = None  # file or folder for every source but the bundled digits
    image_size: int = Field(8, ge=4, le=512)  # square side the images are resized to
    grayscale: bool = False  # collapse colour images to one channel
    val_ratio: float = Field(0.15, gt=0, lt=0.5)
    test_ratio: float = Field(0.2, gt=0, lt=0.5)
    seed: int = Field(0, ge=0)

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).exists():
            raise ValueError(f"path does not exist: {v!r}; give an existing file or folder")
        return v


class TrainConfig(Section):
    arch: str = "resnet18"
    width: float = Field(0.5, gt=0, le=16)  # channel multiplier (widen factor for wrn28_10)
    depth: int = Field(2, ge=1, le=40)  # blocks per stage (resnet18), convs per deep stage (vgg16_bn), total depth (wrn28_10)
    epochs: int = Field(30, ge=1, le=1000)
    batch_size: int = Field(64, ge=1, le=4096)
    lr: float = Field(0.05, gt=0, le=10)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    patience: int = Field(5, ge=1)  # epochs without a val improvement before stopping
    seed: int = Field(0, ge=0)
    resume: bool = True  # continue from the last epoch checkpoint after a crash

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from tasks.models import MODELS  # torch import only when a train section is validated
        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; allowed: {', '.join(sorted(MODELS))}")
        return v


class PruneConfig(Section):
    method: Literal["unstructured", "structured"] = "unstructured"
    sparsity: float = Field(0.5, ge=0, lt=1)  # unstructured: share of conv/linear weights set to zero
    ratio: float = Field(0.5, ge=0, lt=1)  # structured: share of channels removed per layer
    finetune_epochs: int = Field(3, ge=0, le=1000)
    lr: float = Field(0.01, gt=0, le=10)
    batch_size: int = Field(64, ge=1, le=4096)
    seed: int = Field(0, ge=0)


class QuantizeConfig(Section):
    method: Literal["qat", "ptq"] = "qat"  # qat: fake-quant training; ptq: ONNX Runtime static quantization
    epochs: int = Field(4, ge=0, le=1000)
    lr: float = Field(0.005, gt=0, le=10)
    batch_size: int = Field(64, ge=1, le=4096)
    calibration_size: int = Field(256, ge=1, le=100000)  # train images, a seeded subset, for the ranges
    freeze_observers_epoch: int = Field(2, ge=0)  # activation ranges stop moving from this epoch on
    seed: int = Field(0, ge=0)


class DistillConfig(Section):
    epochs: int = Field(4, ge=0, le=1000)
    lr: float = Field(0.005, gt=0, le=10)
    batch_size: int = Field(64, ge=1, le=4096)
    temperature: float = Field(4.0, gt=0, le=100)
    alpha: float = Field(0.7, ge=0, le=1)  # weight of the KL term; 1 - alpha goes to cross-entropy
    seed: int = Field(0, ge=0)


class ExportConfig(Section):
    opset: int = Field(18, ge=13, le=23)


class EvaluateConfig(Section):
    batch_size: int = Field(256, ge=1, le=65536)


class BenchmarkConfig(Section):
    warmup: int = Field(20, ge=0, le=10000)
    runs: int = Field(200, ge=10, le=100000)
    threads: list[int] = Field(default_factory=lambda: [1, 0])  # 0 means all cores

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: list[int]) -> list[int]:
        if not v or any(t < 0 for t in v):
            raise ValueError("threads must be a non-empty list of counts >= 0 (0 = all cores)")
        return v


SECTIONS: dict[str, type[Section]] = {
    "prepare": PrepareConfig,
    "train": TrainConfig,
    "prune": PruneConfig,
    "quantize": QuantizeConfig,
    "distill": DistillConfig,
    "export": ExportConfig,
    "evaluate": EvaluateConfig,
    "benchmark": BenchmarkConfig,
}


def _read(path: Path) -> dict:
    if not path.exists():
        raise ParamsError(f"{path}: file not found; run from the project root or pass --params")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _describe(err: ValidationError, section: str, raw: dict, path: Path) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        key = f"{section}.{loc}" if loc else section
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(SECTIONS[section].model_fields)
            close = difflib.get_close_matches(str(e["loc"][0]), SECTIONS[section].model_fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"{path}: unknown key {key}{hint}; allowed keys: {allowed}")
            continue
        value = raw.get(e["loc"][0], "<missing>") if e["loc"] else raw
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {key} = {value!r}: {msg}")
    return "\n".join(lines)


def parse_section(name: str, raw: dict | None, path: Path = PARAMS_FILE) -> Section:
    """Validate one section's raw mapping into its frozen config."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: section {name!r} must be a mapping of keys, got {raw!r}")
    try:
        return SECTIONS[name].model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_describe(err, name, raw, path)) from None


def load_params(path: Path | str = PARAMS_FILE) -> dict[str, Section]:
    """Validate every section of a params file; unknown sections are an error too."""
    path = Path(path)
    data = _read(path)
    errors = []
    for name in data:
        if name not in SECTIONS:
            close = difflib.get_close_matches(name, SECTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{path}: unknown section {name!r}{hint}; allowed sections: {', '.join(SECTIONS)}")
    configs = {}
    for name in SECTIONS:
        try:
            configs[name] = parse_section(name, data.get(name), path)
        except ParamsError as err:
            errors.append(str(err))
    if errors:
        raise ParamsError("\n".join(errors))
    return configs


def load_section(name: str, path: Path | str = PARAMS_FILE) -> Section:
    """The one section a stage reads."""
    path = Path(path)
    return parse_section(name, _read(path).get(name), path)
