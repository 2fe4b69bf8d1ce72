"""Typed, frozen configs for every `params.yaml` section, validated before any work starts.

Each stage reads only its own section through `load_section`; the CLI validates every section at
once with `load_params` so that a typo stops the run before a single stage executes. The schema
holds each key's type, range and description (`distillery params` prints them); `params.yaml` is
the one source of the values, so no key has a default here (but the optional `prepare.path`) and a
missing one is an error.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from distillery.core.errors import ParamsError
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

PARAMS_FILE = Path("params.yaml")



class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


SOURCE_PATHS = {  # what prepare.path must be for each source
    "npz": "a .npz file with arrays 'x' and 'y'",
    "imagefolder": "a folder with one sub-folder per class",
    "cifar": "a cifar-*-python.tar.gz file or its extracted folder",
    "idx": "a folder of *-images-idx3-ubyte / *-labels-idx1-ubyte pairs",
}


class PrepareConfig(Section):
    source: Literal["digits", "npz", "imagefolder", "cifar", "idx"] = Field(description="digits | npz | imagefolder | cifar | idx")
    path: str | None = Field(None, description="file or folder for every source but the bundled digits")
    image_size: int = Field(ge=4, le=512, description="square side the images are resized to")
    grayscale: bool = Field(description="collapse colour images to one channel")
    val_ratio: float = Field(gt=0, lt=0.5, description="share of the images held out for validation (stratified)")
    test_ratio: float = Field(gt=0, lt=0.5, description="share of the images held out for the test split (stratified)")
    seed: int = Field(ge=0, description="seed of the stratified split")

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).exists():
            raise ValueError(f"path does not exist: {v!r}; give an existing file or folder")
        return v

    @model_validator(mode="after")
    def _path_fits_source(self) -> "PrepareConfig":
        if self.source == "digits":
            return self
        if self.path is None:
            raise ValueError(f"prepare.path is required when prepare.source = {self.source!r}; "
                             f"give the {SOURCE_PATHS[self.source]}")
        is_dir = Path(self.path).is_dir()
        wants_dir = {"npz": False, "imagefolder": True, "idx": True}.get(self.source, is_dir)  # cifar: either
        if is_dir != wants_dir:
            raise ValueError(f"prepare.path = {self.path!r} is a {'folder' if is_dir else 'file'}, but prepare.source = "
                             f"{self.source!r} needs {SOURCE_PATHS[self.source]}")
        return self


class TrainConfig(Section):
    arch: str = Field(description="a model of the zoo (distillery.models.MODELS): resnet18 | vgg16_bn | wrn28_10 | toy | vit")
    width: float = Field(gt=0, le=16, description="channel multiplier (widen factor for wrn28_10)")
    depth: int = Field(ge=1, le=40, description="blocks per stage (resnet18), convs per deep stage (vgg16_bn), total depth (wrn28_10)")
    epochs: int = Field(ge=1, le=1000, description="training epochs")
    batch_size: int = Field(ge=1, le=4096, description="training batch size")
    lr: float = Field(gt=0, le=10, description="peak learning rate (one-cycle cosine schedule)")
    weight_decay: float = Field(ge=0, le=1, description="SGD weight decay")
    patience: int = Field(ge=1, description="epochs without a val improvement before stopping")
    seed: int = Field(ge=0, description="random seed of this step (data order, initialisation, subsets)")
    resume: bool = Field(description="continue from the last epoch checkpoint after a crash")


class PruneConfig(Section):
    method: Literal["unstructured", "structured"] = Field(description="unstructured (the paper: zeros, no speed-up alone) | structured (channels removed)")
    sparsity: float = Field(ge=0, lt=1, description="unstructured: share of conv/linear weights set to zero")
    ratio: float = Field(ge=0, lt=1, description="structured: share of channels removed per layer")
    finetune_epochs: int = Field(ge=0, le=1000, description="fine-tune epochs after pruning, masks held fixed")
    lr: float = Field(gt=0, le=10, description="peak learning rate (one-cycle cosine schedule)")
    batch_size: int = Field(ge=1, le=4096, description="training batch size")
    seed: int = Field(ge=0, description="random seed of this step (data order, initialisation, subsets)")


class QuantizeConfig(Section):
    method: Literal["qat", "ptq"] = Field(description="qat: fake-quant training; ptq: ONNX Runtime static quantization")
    epochs: int = Field(ge=0, le=1000, description="QAT epochs (ignored by ptq)")
    lr: float = Field(gt=0, le=10, description="peak learning rate (one-cycle cosine schedule)")
    batch_size: int = Field(ge=1, le=4096, description="training batch size")
    calibration_size: int = Field(ge=1, le=100000, description="train images, a seeded subset, for the ranges")
    freeze_observers_epoch: int = Field(ge=0, description="activation ranges stop moving from this epoch on")
    seed: int = Field(ge=0, description="random seed of this step (data order, initialisation, subsets)")


class DistillConfig(Section):
    epochs: int = Field(ge=0, le=1000, description="KD epochs; 0 skips distillation")
    lr: float = Field(gt=0, le=10, description="T^2-scaled soft targets: a QAT student at 99 % diverged at 0.005")
    batch_size: int = Field(ge=1, le=4096, description="training batch size")
    temperature: float = Field(gt=0, le=100, description="KD softmax temperature T")
    alpha: float = Field(ge=0, le=1, description="weight of the KL term; 1 - alpha goes to cross-entropy")
    seed: int = Field(ge=0, description="random seed of this step (data order, initialisation, subsets)")


class ExportConfig(Section):
    opset: int = Field(ge=13, le=23, description="ONNX opset of the exported models")


class EvaluateConfig(Section):
    batch_size: int = Field(ge=1, le=65536, description="ONNX Runtime batch size for scoring the test split")


def _thread_counts(v: list[int]) -> list[int]:
    if not v or any(t < 0 for t in v):
        raise ValueError("threads must be a non-empty list of counts >= 0 (0 = all cores)")
    return v


ThreadCounts = Annotated[list[int], AfterValidator(_thread_counts)]  # ORT thread counts to time at; 0 = all cores


class BenchmarkConfig(Section):
    warmup: int = Field(ge=0, le=10000, description="untimed ONNX Runtime runs before timing")
    runs: int = Field(ge=10, le=100000, description="timed ONNX Runtime runs per model (batch 1) for the percentiles")
    threads: ThreadCounts = Field(description="1 thread and all cores (0)")


ABLATION_ORDERS = ("pqd", "pdq", "qpd", "qdp", "dpq", "dqp")  # p = prune, q = quantize (QAT), d = distill
ABLATION_STEP_KEYS = ("sparsity", "prune_epochs", "qat_epochs", "kd_epochs", "prune_lr", "qat_lr", "kd_lr",
                      "batch_size", "temperature", "alpha", "calibration_size", "freeze_observers_epoch", "seeds")


class AblationConfig(Section):
    """The order ablation: one chain per order, same teacher, same epoch budget (paper: 20 / 40 / 40)."""
    sparsity: float = Field(ge=0, lt=1, description="unstructured, global magnitude")
    prune_epochs: int = Field(ge=0, le=1000, description="fine-tune after pruning")
    qat_epochs: int = Field(ge=0, le=1000, description="QAT epochs of every order")
    kd_epochs: int = Field(ge=0, le=1000, description="KD epochs of every order")
    prune_lr: float = Field(gt=0, le=10, description="learning rate of the fine-tune after pruning")
    qat_lr: float = Field(gt=0, le=10, description="learning rate of QAT")
    kd_lr: float = Field(gt=0, le=10, description="learning rate of KD")
    batch_size: int = Field(ge=1, le=4096, description="training batch size")
    temperature: float = Field(gt=0, le=100, description="KD softmax temperature T")
    alpha: float = Field(ge=0, le=1, description="weight of the KL term; 1 - alpha goes to cross-entropy")
    calibration_size: int = Field(ge=1, le=100000, description="train images, a seeded subset per seed, that set the first activation ranges")
    freeze_observers_epoch: int = Field(ge=0, description="QAT epoch from which activation ranges stay put")
    seeds: int = Field(ge=1, le=100, description="seeds 0..seeds-1 per order; the table gives mean and spread")
    warmup: int = Field(ge=0, le=10000, description="report: ORT latency at one thread, interleaved with the teacher")
    runs: int = Field(ge=10, le=100000, description="timed ONNX Runtime runs per model (batch 1) for the percentiles")
    orders: dict[str, dict] = Field(description="order -> overrides")

    @field_validator("orders")
    @classmethod
    def _orders(cls, v: dict[str, dict], info: ValidationInfo) -> dict[str, dict]:
        if not v:
            raise ValueError(f"name at least one order of: {', '.join(ABLATION_ORDERS)}")
        for order, overrides in v.items():
            if order not in ABLATION_ORDERS:
                raise ValueError(f"unknown order {order!r}; allowed: {', '.join(ABLATION_ORDERS)}")
            if not isinstance(overrides, dict):
                raise ValueError(f"orders.{order} must be a mapping of overrides ({{}} for none), got {overrides!r}")
            bad = sorted(set(overrides) - set(ABLATION_STEP_KEYS))
            if bad:
                raise ValueError(f"orders.{order}: unknown override(s) {bad}; allowed: {', '.join(ABLATION_STEP_KEYS)}")
            if not overrides or len(info.data) < len(cls.model_fields) - 1:
                continue  # nothing to check, or a shared key is already wrong and its error says so
            try:
                cls.model_validate({**info.data, **overrides, "orders": {order: {}}})
            except ValidationError as err:
                raise ValueError(f"orders.{order}: {err.errors()[0]['loc'][0]} = "
                                 f"{overrides.get(err.errors()[0]['loc'][0])!r}: {err.errors()[0]['msg']}") from None
        return v

    def for_order(self, order: str) -> "AblationConfig":
        """This config with the order's own overrides applied."""
        if order not in self.orders:
            raise ParamsError(f"ablation.orders has no order {order!r}; it has: {', '.join(self.orders)}")
        return type(self).model_validate({**self.model_dump(), **self.orders[order]})



class PpclTeacherConfig(Section):
    """PPCL's teacher: a caption-conditioned MMDiT trained by flow matching on the prepared digits."""
    width: float = Field(gt=0, le=16, description="hidden size 64 * width")
    depth: int = Field(ge=2, le=64, description="joint blocks")
    steps: int = Field(ge=1, le=1000000, description="800 is not enough for ~0.99 adherence")
    lr: float = Field(gt=0, le=10, description="learning rate (AdamW)")
    batch_size: int = Field(ge=1, le=4096, description="training batch size")
    ema_decay: float = Field(ge=0, lt=1, description="decay of the weights' exponential moving average (the saved teacher)")
    caption_dropout: float = Field(ge=0, lt=1, description="empty captions, for classifier-free guidance")
    sample_steps: int = Field(ge=1, le=1000, description="Euler steps of the sample grid and quality metrics")
    guidance: float = Field(ge=1, le=20, description="classifier-free guidance scale when sampling")
    prompts_per_digit: int = Field(ge=1, le=1000, description="prompts per digit for the sample grid and adherence")
    seed: int = Field(ge=0, description="random seed of this step (data order, initialisation, subsets)")


class PpclProbeConfig(Section):
    """PPCL step 1: residual linear probes per block, fitted on calibration activations."""
    calibration_size: int = Field(ge=8, le=100000, description="noisy inputs (x_t, t, caption) from train")
    ridge: float = Field(ge=0, le=10, description="ridge added to the least-squares fit, for stability")
    finetune_steps: int = Field(ge=0, le=100000, description="gradient steps refining each least-squares probe; 0 keeps the closed form")
    lr: float = Field(gt=0, le=10, description="learning rate of the probe fine-tune")
    seed: int = Field(ge=0, description="random seed of this step (data order, initialisation, subsets)")


class IntervalsConfig(Section):
    """PPCL step 2: cka(u, k), the Delta rule's contiguous intervals and the variants' selections."""
    ratios: list[float] = Field(description="shares of blocks removed, one variant each")
    min_len: int = Field(ge=2, le=64, description="shortest run of blocks one student replaces")
    max_len: int = Field(ge=2, le=64, description="longest interval one student replaces")
    cka_threshold: float = Field(gt=0, le=1, description="the ablation's selector: longest run keeping cka >= threshold")
    ablation_ratio: float = Field(gt=0, lt=1, description="the ablation removes as many blocks as the PPCL variant at this ratio")

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < r < 1 for r in v):
            raise ValueError("ratios must be a non-empty list of shares in (0, 1)")
        return v

    @model_validator(mode="after")
    def _ablation_in_ratios(self) -> "IntervalsConfig":
        if self.ablation_ratio not in self.ratios:
            raise ValueError(f"ablation_ratio {self.ablation_ratio} must be one of ratios {self.ratios}")
        if self.max_len < self.min_len:
            raise ValueError(f"max_len {self.max_len} is below min_len {self.min_len}")
        return self


class DepthDistillConfig(Section):
    """PPCL step 3: one student block per interval, trained independently (concurrently) on teacher activations."""
    data_size: int = Field(ge=8, le=1000000, description="noisy inputs the teacher is traced on")
    steps: int = Field(ge=0, le=1000000, description="per student, lr 1e-3 (300 at 3e-4: 17 % adherence drop at 50 % removed; this: 3.6 %)")
    lr: float = Field(gt=0, le=10, description="learning rate of each student")
    batch_size: int = Field(ge=1, le=65536, description="training batch size")
    loss: Literal["normalized_mse", "normalized_l1", "mse"] = Field(description="student loss against the teacher's interval output: normalized_mse | normalized_l1 | mse")
    workers: int = Field(ge=0, le=256, description="processes training intervals at once; 0 = all cores")
    sequential: bool = Field(description="also the sequential students of the ablation's intervals")
    seed: int = Field(ge=0, description="random seed of this step (data order, initialisation, subsets)")


class WidthPruneConfig(Section):
    """PPCL step 4: residual linear projectors for the FFNs / text MLPs that are most nearly linear."""
    base_ratio: float = Field(ge=0, lt=1, description="the depth variant (an intervals.ratios entry) pruned in width; 0 = teacher")
    ffn: int = Field(ge=0, le=64, description="image FFNs replaced (lowest linear replacement error)")
    text_mlp: int = Field(ge=0, le=64, description="text-stream MLPs replaced")
    data_size: int = Field(ge=8, le=1000000, description="noisy inputs the variant is traced on for the projectors")
    ridge: float = Field(ge=0, le=10, description="ridge added to the least-squares fit, for stability")
    steps: int = Field(ge=0, le=1000000, description="0 keeps the least-squares projectors")
    lr: float = Field(gt=0, le=10, description="learning rate of the projectors")
    batch_size: int = Field(ge=1, le=65536, description="training batch size")
    seed: int = Field(ge=0, description="random seed of this step (data order, initialisation, subsets)")


class MenuConfig(Section):
    """PPCL's menu: variants assembled from the trained students, exported, timed and scored."""
    sample_steps: int = Field(ge=1, le=1000, description="Euler steps per sample")
    guidance: float = Field(ge=1, le=20, description="classifier-free guidance scale when sampling")
    prompts_per_digit: int = Field(ge=1, le=1000, description="200 fixed prompts")
    seed: int = Field(ge=0, description="seed of the fixed prompts and their noise")
    opset: int = Field(ge=13, le=23, description="ONNX opset of the exported models")
    warmup: int = Field(ge=0, le=10000, description="untimed ONNX Runtime runs before timing")
    runs: int = Field(ge=10, le=100000, description="timed ONNX Runtime runs per model (batch 1) for the percentiles")
    threads: ThreadCounts = Field(description="1 thread and all cores (0)")


SECTIONS: dict[str, type[Section]] = {
    "prepare": PrepareConfig,
    "train": TrainConfig,
    "prune": PruneConfig,
    "quantize": QuantizeConfig,
    "distill": DistillConfig,
    "export": ExportConfig,
    "evaluate": EvaluateConfig,
    "benchmark": BenchmarkConfig,
    "ablation": AblationConfig,
    "ppcl_teacher": PpclTeacherConfig,
    "probe": PpclProbeConfig,
    "intervals": IntervalsConfig,
    "depth_distill": DepthDistillConfig,
    "width_prune": WidthPruneConfig,
    "menu": MenuConfig,
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
        if e["type"] == "missing" and len(e["loc"]) == 1:
            field = SECTIONS[section].model_fields[str(e["loc"][0])]
            lines.append(f"{path}: missing key {key} ({field.description}); add it to the {section!r} section")
            continue
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(SECTIONS[section].model_fields)
            close = difflib.get_close_matches(str(e["loc"][0]), SECTIONS[section].model_fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"{path}: unknown key {key}{hint}; allowed keys: {allowed}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if not e["loc"]:  # a check across keys names them in its message
            lines.append(f"{path}: {msg}")
            continue
        value = raw.get(e["loc"][0], "<missing>")
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
