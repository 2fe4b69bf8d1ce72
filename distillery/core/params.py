"""Typed, frozen configs for every `params.yaml` section, validated before any work starts.

Each stage reads only its own section through `load_section`; the CLI validates every section at
once with `load_params` so that a typo stops the run before a single stage executes. The schema
holds each key's type, range and description (`distillery params` prints them); `params.yaml` is
the one source of the values, so no key has a default here (but the optional files of the user's
own data and model: `prepare.path`, `prepare.test_path`, `train.weights`, and `train.model_kwargs`) and a missing one is an error.
"""
from __future__ import annotations

import difflib
import re
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


class Normalization(Section):
    """prepare.normalize given explicitly: x = (pixel in [0, 1] - mean) / std, per channel."""
    mean: list[float] = Field(description="one value per channel (after prepare.grayscale)")
    std: list[float] = Field(description="one value > 0 per channel")

    @model_validator(mode="after")
    def _one_per_channel(self) -> "Normalization":
        if not self.mean or len(self.mean) != len(self.std):
            raise ValueError(f"{len(self.mean)} mean and {len(self.std)} std values; give one of each per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std {self.std}: give a value > 0 for every channel")
        return self


NORMALIZE_HELP = "dataset (the train split's per-channel mean/std) | none (pixels in [0, 1]) | {mean: [...], std: [...]}"
SOURCE_CHANNELS = {"digits": 1, "idx": 1, "cifar": 3, "imagefolder": 3}  # before grayscale; an NPZ's header says


class PrepareConfig(Section):
    source: Literal["digits", "npz", "imagefolder", "cifar", "idx"] = Field(description="digits | npz | imagefolder | cifar | idx")
    path: str | None = Field(None, description="file or folder for every source but the bundled digits")
    test_path: str | None = Field(None, description="your own held-out test split, in the format of path and with its "
                                                    "classes (matched by name); val is still carved from path")
    image_size: int = Field(ge=4, le=512, description="square side: the shorter side is resized to it, then the centre "
                                                      "square is cropped (torchvision's Resize + CenterCrop)")
    grayscale: bool = Field(description="collapse colour images to one channel")
    normalize: Literal["dataset", "none"] | Normalization = Field(description=NORMALIZE_HELP)
    val_ratio: float = Field(gt=0, lt=0.5, description="share of the images of path held out for validation (stratified)")
    test_ratio: float = Field(gt=0, lt=0.5, description="share of the images held out for the test split (stratified); "
                                                        "ignored when test_path is given or the source has its official "
                                                        "test files (CIFAR test_batch/test, IDX t10k-*)")
    seed: int = Field(ge=0, description="seed of the stratified split")

    @field_validator("path", "test_path")
    @classmethod
    def _path_exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).exists():
            raise ValueError(f"path does not exist: {v!r}; give an existing file or folder")
        return v

    @field_validator("normalize", mode="before")
    @classmethod
    def _normalize(cls, v: object) -> object:
        if isinstance(v, dict):
            try:
                return Normalization.model_validate(v)
            except ValidationError as err:
                e = err.errors()[0]
                msg = e["msg"].removeprefix("Value error, ")
                if e["loc"]:  # a key of the mapping; the checks across keys say what to give themselves
                    msg = f"{'.'.join(str(p) for p in e['loc'])}: {msg}; give {{mean: [...], std: [...]}}, one value per channel"
                raise ValueError(msg) from None
        if v not in ("dataset", "none"):
            raise ValueError(f"allowed: {NORMALIZE_HELP}")
        return v

    @model_validator(mode="after")
    def _path_fits_source(self) -> "PrepareConfig":
        if self.source == "digits":
            if self.test_path is not None:
                raise ValueError(f"prepare.test_path = {self.test_path!r} needs your own data, but prepare.source = "
                                 "'digits' is the bundled set; use source npz (or another) for your data")
            return self
        if self.path is None:
            raise ValueError(f"prepare.path is required when prepare.source = {self.source!r}; "
                             f"give the {SOURCE_PATHS[self.source]}")
        for key, value in (("path", self.path), ("test_path", self.test_path)):
            if value is None:
                continue
            is_dir = Path(value).is_dir()
            wants_dir = {"npz": False, "imagefolder": True, "idx": True}.get(self.source, is_dir)  # cifar: either
            if is_dir != wants_dir:
                raise ValueError(f"prepare.{key} = {value!r} is a {'folder' if is_dir else 'file'}, but prepare.source = "
                                 f"{self.source!r} needs {SOURCE_PATHS[self.source]}")
        if self.test_path is not None:
            train, test = Path(self.path).resolve(), Path(self.test_path).resolve()
            if train == test or train.is_relative_to(test) or test.is_relative_to(train):
                raise ValueError(f"prepare.test_path = {self.test_path!r} overlaps prepare.path = {self.path!r}: the test "
                                 "images would also be training images; give a held-out split in a place of its own")
        return self

    @model_validator(mode="after")
    def _normalize_fits_channels(self) -> "PrepareConfig":
        if isinstance(self.normalize, str) or self.source not in SOURCE_CHANNELS:
            return self  # an NPZ's channels are known from its header: the preflight (check_source) compares them
        channels = 1 if self.grayscale else SOURCE_CHANNELS[self.source]
        if len(self.normalize.mean) != channels:
            raise ValueError(f"prepare.normalize has {len(self.normalize.mean)} mean/std values, but prepare.source = "
                             f"{self.source!r} with prepare.grayscale = {str(self.grayscale).lower()} makes "
                             f"{channels}-channel images; give one mean and one std per channel")
        return self


MODEL_REF = re.compile(r"^([A-Za-z_][\w]*|[^:\s]+:[A-Za-z_][\w.]*)$")  # zoo name, or target:function


class TrainConfig(Section):
    model: str = Field(description="a zoo model (resnet18 | vgg16_bn | wrn28_10 | toy | vit) or a factory "
                                   "returning an nn.Module: path/to/file.py:function or package.module:function")
    model_kwargs: dict = Field({}, description="keyword arguments of the zoo model (width, depth, ...; in_channels and "
                                               "num_classes come from the data) or of the factory, passed as they are")
    weights: str | None = Field(None, description="the user's trained weights: a state_dict in .safetensors or a torch "
                                                  "file (read with weights_only=True); epochs 0 adopts them as the teacher")
    epochs: int = Field(ge=0, le=1000, description="training epochs; 0 adopts the model as it is (needs weights)")
    batch_size: int = Field(ge=1, le=4096, description="training batch size")
    lr: float = Field(gt=0, le=10, description="peak learning rate (one-cycle cosine schedule)")
    weight_decay: float = Field(ge=0, le=1, description="SGD weight decay")
    patience: int = Field(ge=1, description="epochs without a val improvement before stopping")
    seed: int = Field(ge=0, description="random seed of this step (data order, initialisation, subsets)")
    resume: bool = Field(description="continue from the last epoch checkpoint after a crash")

    @field_validator("model")
    @classmethod
    def _model_ref(cls, v: str) -> str:
        if not MODEL_REF.match(v):
            raise ValueError("give a zoo name (resnet18) or a factory: path/to/file.py:function or package.module:function")
        target = v.partition(":")[0]
        if ":" in v and (target.endswith(".py") or "/" in target) and not Path(target).is_file():
            raise ValueError(f"factory file {target} does not exist (paths are relative to the project root)")
        return v

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"weights file {v!r} does not exist; give a .safetensors or torch state_dict file")
        return v

    @model_validator(mode="after")
    def _adopt_needs_weights(self) -> "TrainConfig":
        if self.epochs == 0 and self.weights is None:
            raise ValueError("train.epochs = 0 adopts a trained model as the teacher, so it needs train.weights; "
                             "give the weights file or train for some epochs")
        return self


class PruneConfig(Section):
    method: Literal["unstructured", "structured"] = Field(description="unstructured (the paper: zeros, no speed-up alone) | structured (channels removed)")
    sparsity: float = Field(ge=0, lt=1, description="unstructured: share of conv/linear weights set to zero")
    ratio: float = Field(ge=0, lt=1, description="structured: share of channels removed per layer")
    round_to: int = Field(ge=0, le=512, description="structured: each layer keeps a multiple of this many channels "
                                                    "(0 = any count)")
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
    batch: int = Field(ge=1, le=4096, description="throughput: images per batch, timed at every thread count")
    batch_runs: int = Field(ge=1, le=100000, description="timed runs per model at that batch")
    profile_runs: int = Field(ge=0, le=100000, description="ORT profiler runs for 'where the time goes' (0 = no profile)")


PEERS = ("ort_u8s8", "ort_s8s8", "nncf", "olive")  # the post-training quantizers of the baselines stage


class BaselinesConfig(Section):
    """The post-training quantizers a user would pick instead, each applied to the FP32 teacher's ONNX."""
    peers: dict[str, bool] = Field(description="peer -> true | false: " + ", ".join(PEERS))

    @field_validator("peers")
    @classmethod
    def _known(cls, v: dict[str, bool]) -> dict[str, bool]:
        for name in v:
            if name not in PEERS:
                close = difflib.get_close_matches(name, PEERS, n=1)
                raise ValueError(f"unknown peer {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                                 f"allowed: {', '.join(PEERS)}")
        return v


class CounterpartConfig(Section):
    enabled: bool = Field(description="also build P->Q->D with the other prune.method (QAT; the prune, quantize and "
                                      "distill settings) so the report shows unstructured and structured side by side")


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
    """PPCL's teacher: `digits` (a diffusers SD3Transformer2DModel trained here by flow matching on the
    prepared digits), `text` (a transformers LlamaForCausalLM trained here on Python's own docs), or the
    path of a user's save_pretrained folder (diffusers or transformers), read offline."""
    model: str = Field(min_length=1, description="digits | text | path to a save_pretrained folder")
    subfolder: str | None = Field(default=None, description="the model's subfolder in a pipeline folder, e.g. transformer")
    inputs: str | None = Field(default=None, description="a folder model's inputs: a capture file (.pt) or file.py:function")
    inputs_size: int = Field(ge=8, le=10000000, description="calibration / training samples (seeded subset)")
    heldout_size: int = Field(ge=1, le=100000, description="held-out samples the menu's fidelity is measured on")
    device: str = Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto | cpu | cuda: where training and tracing run")
    width: float = Field(gt=0, le=16, description="digits: hidden 64 * width; text: hidden 128 * width")
    depth: int = Field(ge=2, le=64, description="blocks (digits) / decoder layers (text)")
    steps: int = Field(ge=1, le=1000000, description="training steps of a model trained here")
    lr: float = Field(gt=0, le=10, description="learning rate (AdamW)")
    batch_size: int = Field(ge=1, le=4096, description="training batch size")
    seq_len: int = Field(ge=8, le=8192, description="text: tokens (bytes) per training / held-out sequence")
    ema_decay: float = Field(ge=0, lt=1, description="digits: decay of the weights' moving average (the saved teacher)")
    caption_dropout: float = Field(ge=0, lt=1, description="digits: empty captions, for classifier-free guidance")
    sample_steps: int = Field(ge=1, le=1000, description="digits: Euler steps of the sample grid and quality metrics")
    guidance: float = Field(ge=1, le=20, description="digits: classifier-free guidance scale when sampling")
    prompts_per_digit: int = Field(ge=1, le=1000, description="digits: prompts per digit for the sample grid and adherence")
    seed: int = Field(ge=0, description="random seed of this step (data order, initialisation, subsets)")

    @model_validator(mode="after")
    def _inputs_for_folders(self) -> "PpclTeacherConfig":
        if self.model not in ("digits", "text") and not self.inputs:
            raise ValueError(f"ppcl_teacher.model = {self.model!r} is a folder: set ppcl_teacher.inputs to a capture "
                             "file (record one with distillery.ppcl.capture) or to file.py:function returning the "
                             "forward's keyword arguments")
        return self


class PpclProbeConfig(Section):
    """PPCL step 1: residual linear probes per block, fitted on calibration activations."""
    calibration_size: int = Field(ge=8, le=100000, description="calibration inputs the probes are fitted on (the first of ppcl_teacher's)")
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
    data_size: int = Field(ge=8, le=1000000, description="calibration inputs the teacher is traced on")
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
    ffn: int = Field(ge=0, le=64, description="image-stream FFNs (an LLM's MLPs) replaced (lowest linear replacement error)")
    text_mlp: int = Field(ge=0, le=64, description="text-stream MLPs replaced")
    data_size: int = Field(ge=8, le=1000000, description="calibration inputs the variant is traced on for the projectors")
    ridge: float = Field(ge=0, le=10, description="ridge added to the least-squares fit, for stability")
    steps: int = Field(ge=0, le=1000000, description="0 keeps the least-squares projectors")
    lr: float = Field(gt=0, le=10, description="learning rate of the projectors")
    batch_size: int = Field(ge=1, le=65536, description="training batch size")
    seed: int = Field(ge=0, description="random seed of this step (data order, initialisation, subsets)")


class MenuConfig(Section):
    """PPCL's menu: variants assembled from the trained students, exported, timed and scored."""
    sample_steps: int = Field(ge=1, le=1000, description="digits: Euler steps per sample")
    guidance: float = Field(ge=1, le=20, description="digits: classifier-free guidance scale when sampling")
    prompts_per_digit: int = Field(ge=1, le=1000, description="digits: 200 fixed prompts")
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
    "baselines": BaselinesConfig,
    "counterpart": CounterpartConfig,
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
