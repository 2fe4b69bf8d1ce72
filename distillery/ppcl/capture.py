"""Model inputs recorded from the user's own runs: what PPCL calibrates on and trains students from.

`ModelInputs` holds the keyword arguments a model's `forward` is called with, for many samples at
once: `batched` values have one row per sample (latents, text embeddings, timesteps, token ids, and
per-sample lists such as Qwen-Image's `img_shapes`), `static` values are the same for every call
(Flux's `img_ids` / `txt_ids`). `capture(model)` records them from whatever code the user runs the
model with (a diffusers pipeline, an evaluation script; not an LLM's `generate()`, whose calls after the
first feed one token each: capture plain forward calls on the prompts). Floating tensors are
kept in float32, a value given once for the whole batch (a timestep of shape (1,)) is repeated per sample,
and a padding mask that some calls leave out (no padding) is filled with ones:

    with capture(pipe.transformer) as rec:
        pipe(prompts, num_inference_steps=20)
    rec.save("inputs.pt")

`load_inputs` reads such a file, or calls a user function `file.py:function` (or
`package.module:function`) that returns or yields keyword-argument dicts, and checks the result.
"""
from __future__ import annotations

import hashlib
import inspect
import io
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn as nn

from distillery.core.artifacts import atomic_path
from distillery.core.errors import DataError

# never inputs: output switches and generation state (capture plain forward calls, or generate()'s prefill:
# a decode step's cache and one-token inputs are not calibration data)
DROP = {"return_dict", "use_cache", "output_attentions", "output_hidden_states", "cache", "past_key_values",
        "cache_position", "logits_to_keep", "labels"}
MASKS = {"attention_mask": "input_ids", "encoder_hidden_states_mask": "encoder_hidden_states"}  # mask -> its tensor


@dataclass
class ModelInputs:
    batched: dict[str, Any] = field(default_factory=dict)  # tensors (n, ...) or lists of n
    static: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        for v in self.batched.values():
            return len(v)
        return 0

    def take(self, idx) -> "ModelInputs":
        """Rows `idx`: a slice, or a 1-D index tensor / list."""
        out = {}
        for k, v in self.batched.items():
            if isinstance(v, torch.Tensor):
                out[k] = v[idx]
            elif isinstance(idx, slice):
                out[k] = v[idx]
            else:
                out[k] = [v[int(i)] for i in idx]
        return ModelInputs(out, self.static)

    def kwargs(self) -> dict[str, Any]:
        return {**self.static, **self.batched}

    def to(self, device) -> "ModelInputs":
        return ModelInputs({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.batched.items()},
                           {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.static.items()})

    def as_float32(self) -> "ModelInputs":
        """Floating tensors in float32 (PPCL runs the model in float32; pipelines often run in half)."""
        def f(v):
            return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        return ModelInputs({k: f(v) for k, v in self.batched.items()}, {k: f(v) for k, v in self.static.items()})

    def state(self) -> dict:
        return {"batched": self.batched, "static": self.static}

    def digest(self) -> str:
        """md5 of the inputs' bytes (what the lineage records)."""
        buf = io.BytesIO()
        torch.save(self.state(), buf)
        return hashlib.md5(buf.getvalue()).hexdigest()

    @staticmethod
    def cat(parts: Iterable["ModelInputs"]) -> "ModelInputs":
        parts = list(parts)
        if not parts:
            raise DataError("no model inputs were captured: run the model at least once inside capture()")
        parts = _fill_masks(parts)
        keys = set(parts[0].batched)
        for i, p in enumerate(parts[1:], 1):
            if set(p.batched) != keys:
                raise DataError(f"captured call {i} has inputs {sorted(p.batched)}, call 0 has {sorted(keys)}: "
                                "capture calls of one kind (same arguments) only")
            for k, v in p.static.items():
                if not _same(v, parts[0].static.get(k)):
                    raise DataError(f"input {k!r} differs between captured calls 0 and {i} but is not per-sample: "
                                    "capture one resolution / sequence length per file")
        out = {}
        for k in keys:
            vals = [p.batched[k] for p in parts]
            if isinstance(vals[0], torch.Tensor):
                shapes = {tuple(v.shape[1:]) for v in vals}
                if len(shapes) > 1:
                    raise DataError(f"input {k!r} has different shapes in different calls ({sorted(shapes)}): capture "
                                    "one resolution / sequence length per file (pad token ids to one length)")
                out[k] = torch.cat(vals)
            else:
                out[k] = [x for v in vals for x in v]
        return ModelInputs(out, parts[0].static)

    def subset(self, n: int, seed: int) -> "ModelInputs":
        """A seeded random subset of `n` samples (all of them, shuffled, when there are fewer)."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.take(perm[:n])


def _fill_masks(parts: list[ModelInputs]) -> list[ModelInputs]:
    """A padding mask some calls pass and others leave out (no padding, e.g. Qwen-Image's pipeline drops an
    all-ones mask) is filled with ones where it is missing."""
    for mask, of in MASKS.items():
        if any(mask in p.batched for p in parts) and not all(mask in p.batched for p in parts):
            parts = [p if mask in p.batched or of not in p.batched else
                     ModelInputs({**p.batched, mask: torch.ones(p.batched[of].shape[:2], dtype=torch.long)}, p.static)
                     for p in parts]
    return parts


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _detach(v):
    if isinstance(v, torch.Tensor):
        v = v.detach().to("cpu")
        return v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone()  # PPCL runs in float32
    if isinstance(v, (list, tuple)):
        return type(v)(_detach(x) for x in v)
    return v


def split_call(kwargs: Mapping[str, Any]) -> ModelInputs:
    """One call's keyword arguments as `ModelInputs`: a tensor or list whose first dimension is the batch
    size (that of the first tensor argument) is per-sample, everything else static."""
    for k, v in kwargs.items():
        if isinstance(v, dict) and k in MASKS:
            raise DataError(f"input {k!r} is a dict of masks: capture calls that pass one padding mask tensor")
    kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in DROP and not isinstance(v, dict)}
    tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    if not tensors:
        raise DataError(f"a call has no tensor inputs ({sorted(kwargs)}): nothing to calibrate on")
    n = len(tensors[0])
    batched, static = {}, {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == 1 < n and k not in ("img_ids", "txt_ids"):
            v = v.expand(n, *v.shape[1:])  # one value for the whole batch (a timestep, position ids): per sample
        per_sample = (isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == n) or \
                     (isinstance(v, list) and len(v) == n and k != "txt_seq_lens")
        (batched if per_sample else static)[k] = _detach(v)
    if n == 1:  # a lone sample: ids tables (seq, 3) would pass as per-sample otherwise
        for k in ("img_ids", "txt_ids"):
            if k in batched:
                static[k] = batched.pop(k)
    for k in ("img_ids", "txt_ids"):  # Flux: position tables, never per-sample
        if k in batched and batched[k].dim() == 2:
            static[k] = batched.pop(k)
    return ModelInputs(batched, static)


class Recorder:
    def __init__(self):
        self.calls: list[ModelInputs] = []

    def inputs(self) -> ModelInputs:
        return ModelInputs.cat(self.calls)

    def save(self, path: Path | str) -> Path:
        return save_inputs(self.inputs(), path)


@contextmanager
def capture(model: nn.Module, max_calls: int | None = None) -> Iterator[Recorder]:
    """Record the keyword arguments of every `model.forward` call made inside the block (positional
    arguments are named from the signature); tensors are copied to the CPU."""
    rec = Recorder()
    sig = inspect.signature(model.forward)

    def hook(module, args, kwargs):
        if max_calls is None or len(rec.calls) < max_calls:
            bound = sig.bind_partial(*args, **kwargs).arguments
            extra = bound.pop("kwargs", {}) if "kwargs" in sig.parameters else {}
            rec.calls.append(split_call({**bound, **extra}))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield rec
    finally:
        handle.remove()


def save_inputs(inputs: ModelInputs, path: Path | str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"format": "distillery.model_inputs/1", **inputs.state()}, f)
    return path


def read_inputs_file(path: Path | str) -> ModelInputs:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: inputs file not found; record one with distillery.ppcl.capture.capture() "
                        "or point ppcl_teacher.inputs at file.py:function")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"{path}: not a readable inputs file ({type(err).__name__}: {err}); write it with "
                        "distillery.ppcl.capture.save_inputs or Recorder.save") from None
    if isinstance(raw, dict) and "batched" in raw:
        return ModelInputs(dict(raw["batched"]), dict(raw.get("static", {})))
    if isinstance(raw, dict):  # a plain {name: batch-first tensor} dict
        return split_call(raw)
    if isinstance(raw, list):  # a list of call kwargs
        return ModelInputs.cat(split_call(c) for c in raw)
    raise DataError(f"{path}: holds a {type(raw).__name__}; expected the dict Recorder.save writes, "
                    "a {name: tensor} dict or a list of such dicts")


def inputs_from_function(ref: str) -> ModelInputs:
    """Call a user function (`file.py:function` or `package.module:function`, no arguments) that returns a
    kwargs dict, or returns / yields several; their samples are concatenated."""
    from distillery.models.factory import resolve
    fn = resolve(ref, "ppcl_teacher.inputs")
    try:
        out = fn()
    except Exception as err:
        raise DataError(f"{ref}: the inputs function failed: {type(err).__name__}: {err}") from None
    calls = [out] if isinstance(out, Mapping) else list(out)
    if not all(isinstance(c, Mapping) for c in calls):
        raise DataError(f"{ref}: must return or yield dicts of forward keyword arguments, got "
                        f"{type(calls[0]).__name__ if calls else 'nothing'}")
    return ModelInputs.cat(split_call(c) for c in calls)


def load_inputs(source: str, root: Path | None = None) -> ModelInputs:
    """Inputs from a capture file (.pt / .pth) or a user function `file.py:function`."""
    from distillery.models.factory import is_factory
    if is_factory(source):
        return inputs_from_function(source).as_float32()
    path = Path(source)
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    return read_inputs_file(path).as_float32()
