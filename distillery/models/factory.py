"""A user's own network: built by a factory reference, loaded with the user's trained weights.

A reference is `path/to/file.py:function` (a file, relative to the project) or
`package.module:function` (anything importable: `timm:create_model`, `torchvision.models:resnet18`).
The function is called with the user's keyword arguments and must return an `nn.Module`.

Weights are a state_dict in `.safetensors`, or a torch file read with `weights_only=True` (never
unpickling code): a bare state_dict, or a checkpoint dict holding one under a usual key.
Every failure is one `ParamsError` naming the reference or the file and the fix.
"""
from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import importlib.util
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from distillery.core.errors import ParamsError

REF = re.compile(r"^(?P<target>[^:]+):(?P<fn>[A-Za-z_][\w.]*)$")
STATE_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net", "weights", "params")


def is_factory(ref: str) -> bool:
    """Whether `ref` is a factory reference (`target:function`) rather than a zoo name."""
    return ":" in ref


def _split(ref: str) -> tuple[str, str]:
    m = REF.match(ref)
    if m is None:
        raise ParamsError(f"train.model = {ref!r}: not a factory reference; write path/to/file.py:function "
                          "or package.module:function (or a zoo name)")
    return m["target"], m["fn"]


_TORCHVISION_OPS: list = []  # keeps the declared op library alive


def _declare_torchvision_ops() -> None:
    """PyPI's torchvision wheel for Linux is built against CUDA torch: beside the CPU build of torch its C++
    extension (detection ops only: nms, roi_align, ...) does not load, and `import torchvision` fails while
    registering a fake kernel for `torchvision::nms`. Classifiers never call those ops, so their schemas are
    declared without kernels and the import goes through (a detection op would then fail when called)."""
    if not _TORCHVISION_OPS:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_OPS.append(lib)


def _retrying_torchvision(load):
    try:
        return load()
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
        _declare_torchvision_ops()
        return load()


def import_module(name: str):
    """`importlib.import_module`, also for torchvision / timm next to a CPU torch (see `_declare_torchvision_ops`)."""
    return _retrying_torchvision(lambda: importlib.import_module(name))


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _import_file(path: Path):
    path = path.resolve()
    name = f"_distillery_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    folder = str(path.parent)
    if folder not in sys.path:  # the user's file may import its siblings, as it does when run as a script
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    no_cache, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in the user's folders
    try:
        _retrying_torchvision(lambda: spec.loader.exec_module(module))
    except Exception as err:
        del sys.modules[name]
        raise ParamsError(f"train.model: importing {path} failed: {type(err).__name__}: {err}; "
                          "fix the file so that `python <file>` imports cleanly") from None
    finally:
        sys.dont_write_bytecode = no_cache
    return module


def resolve(ref: str) -> Callable[..., nn.Module]:
    """The callable a factory reference names, imported (a file is relative to the current folder)."""
    target, fn = _split(ref)
    if _is_file(target):
        path = Path(target)
        if not path.is_file():
            raise ParamsError(f"train.model = {ref!r}: file {target} not found; give a path relative to the project "
                              "root, e.g. models/net.py:build")
        module = _import_file(path)
    else:
        try:
            module = import_module(target)
        except ImportError as err:
            raise ParamsError(f"train.model = {ref!r}: cannot import {target} ({err}); install it or give "
                              "path/to/file.py:function") from None
    obj = module
    for part in fn.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; it defines: {', '.join(names[:10]) or 'nothing callable'}"
            raise ParamsError(f"train.model = {ref!r}: {target} has no {fn!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ParamsError(f"train.model = {ref!r}: {fn} is a {type(obj).__name__}, not a function or class")
    return obj


def build(ref: str, kwargs: dict) -> nn.Module:
    """Call the factory with `kwargs`; it must return an nn.Module."""
    factory = resolve(ref)
    try:
        model = factory(**kwargs)
    except Exception as err:
        raise ParamsError(f"train.model = {ref!r}: calling it with train.model_kwargs = {kwargs!r} failed: "
                          f"{type(err).__name__}: {str(err)[:300]}") from None
    if not isinstance(model, nn.Module):
        raise ParamsError(f"train.model = {ref!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def source_files(ref: str, root: Path | str = ".") -> list[Path]:
    """The project files a factory's code comes from (its file and the project files it imports), relative
    to `root`; empty for an installed package outside the project. DVC tracks these as deps."""
    root = Path(root).resolve()
    target, _ = _split(ref)
    if _is_file(target):
        start = (root / target).resolve()
    else:
        spec = importlib.util.find_spec(target.split(".")[0])
        try:
            start = Path(importlib.util.find_spec(target).origin).resolve() if spec else None
        except (ImportError, TypeError, AttributeError):
            start = None
    if start is None or not start.is_file() or not start.is_relative_to(root):
        return []
    seen, todo = {start}, [start]
    while todo:
        path = todo.pop()
        try:
            tree = ast.parse(path.read_text())
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] + [f"{node.module}.{a.name}" if node.module else a.name for a in node.names] \
                if isinstance(node, ast.ImportFrom) else []
            bases = [path.parent] if isinstance(node, ast.Import) or not getattr(node, "level", 0) \
                else [path.parents[node.level - 1]]
            for name in names:
                for base in {*bases, root} if not getattr(node, "level", 0) else bases:
                    cand = base.joinpath(*name.split("."))
                    for f in (cand.with_suffix(".py"), cand / "__init__.py"):
                        f = f.resolve()
                        if f.is_file() and f.is_relative_to(root) and f not in seen and ".venv" not in f.parts:
                            seen.add(f)
                            todo.append(f)
    return sorted(p.relative_to(root) for p in seen)


def _find_state(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in STATE_KEYS:
            if key in obj and isinstance(obj[key], dict):
                return _find_state(obj[key], path)
    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise ParamsError(f"train.weights = {str(path)!r}: no state_dict found (top-level keys {keys}); save "
                      f"model.state_dict(), or a dict holding it under one of {', '.join(STATE_KEYS)}")


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """A state_dict from `.safetensors` or a torch file (weights_only); a `module.` prefix (DataParallel) is dropped."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"train.weights = {str(path)!r}: file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ParamsError(f"train.weights = {str(path)!r}: not a readable safetensors file ({err})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            if found is None:
                raise ParamsError(f"train.weights = {str(path)!r}: not a readable torch file (not a pickle of "
                                  "tensors); save model.state_dict() with torch.save or safetensors") from None
            raise ParamsError(f"train.weights = {str(path)!r}: the file needs unsafe unpickling (it holds a "
                              f"{found[1]}, not only tensors); save model.state_dict() with torch.save or "
                              "safetensors") from None
        except (RuntimeError, OSError, EOFError, ValueError) as err:
            raise ParamsError(f"train.weights = {str(path)!r}: not a readable torch file "
                              f"({str(err).splitlines()[0][:200] if str(err) else type(err).__name__})") from None
        state = _find_state(obj, path)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_user_weights(model: nn.Module, path: Path | str) -> nn.Module:
    """Load the user's trained weights into `model` strictly; a mismatch names the first offending keys."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) {unexpected[:3]}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es) {wrong[:3]} (file vs model)")
    if problems:
        raise ParamsError(f"train.weights = {str(path)!r} does not fit the model: {'; '.join(problems)}; "
                          "check train.model and train.model_kwargs against how the weights were saved")
    model.load_state_dict(state, strict=True)
    return model


def file_md5(path: Path | str) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()
