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


def _split(ref: str, key: str = "train.model") -> tuple[str, str]:
    m = REF.match(ref)
    if m is None:
        raise ParamsError(f"{key} = {ref!r}: not a factory reference; write path/to/file.py:function "
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


def resolve(ref: str, key: str = "train.model") -> Callable[..., nn.Module]:
    """The callable a factory reference names, imported (a file is relative to the current folder);
    `key` names the params key in messages."""
    target, fn = _split(ref, key)
    if _is_file(target):
        path = Path(target)
        if not path.is_file():
            raise ParamsError(f"{key} = {ref!r}: file {target} not found; give a path relative to the project "
                              "root, e.g. models/net.py:build")
        module = _import_file(path)
    else:
        try:
            module = import_module(target)
        except ImportError as err:
            raise ParamsError(f"{key} = {ref!r}: cannot import {target} ({err}); install it or give "
                              "path/to/file.py:function") from None
        except Exception as err:  # the module itself is broken: a SyntaxError, an error at import time
            raise ParamsError(f"{key} = {ref!r}: importing {target} failed: {type(err).__name__}: "
                              f"{str(err).splitlines()[0][:300] if str(err) else ''}; fix the module so that it "
                              "imports cleanly") from None
    obj = module
    for part in fn.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; it defines: {', '.join(names[:10]) or 'nothing callable'}"
            raise ParamsError(f"{key} = {ref!r}: {target} has no {fn!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ParamsError(f"{key} = {ref!r}: {fn} is a {type(obj).__name__}, not a function or class")
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


def _installed(path: Path) -> bool:
    """Whether `path` belongs to an installed package (a virtual environment, site-packages), not to the user."""
    return bool({"site-packages", "dist-packages", ".venv", "venv"} & set(path.parts)) or \
        path.is_relative_to(Path(sys.prefix).resolve()) or path.is_relative_to(Path(sys.base_prefix).resolve())


def source_files(ref: str, root: Path | str = ".") -> list[Path]:
    """The user's files a factory's code comes from: its file and the user files it imports, transitively.

    Paths inside `root` come back relative to it, others absolute; empty for an installed package
    (`timm:create_model`: its version is pinned, not tracked as a file). DVC tracks these as deps.
    Imports resolve as Python resolves them for the factory: against the factory file's folder and
    the project root (absolute), or the importing file's package (relative); a package's
    `__init__.py` counts too.
    """
    root = Path(root).resolve()
    target, _ = _split(ref)
    if _is_file(target):
        start = (root / target).resolve()
    else:
        try:
            spec = importlib.util.find_spec(target)
        except (ImportError, ValueError, AttributeError):
            spec = None
        start = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if start is None or not start.is_file() or _installed(start):
        return []
    search = [start.parent, root]
    seen, todo = {start}, [start]

    def add(f: Path) -> None:
        f = f.resolve()
        if f.is_file() and f not in seen and not _installed(f):
            seen.add(f)
            todo.append(f)

    while todo:
        path = todo.pop()
        try:
            tree = ast.parse(path.read_text())
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names, bases = [a.name for a in node.names], search
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                names = [mod] + [f"{mod}.{a.name}" if mod else a.name for a in node.names]
                bases = [path.parents[node.level - 1]] if node.level else search
            else:
                continue
            for name in names:
                parts = [p for p in name.split(".") if p]
                for base in bases:
                    for i in range(1, len(parts) + 1):  # a package's __init__ runs before its modules
                        cand = base.joinpath(*parts[:i])
                        add(cand.with_suffix(".py"))
                        add(cand / "__init__.py")
    return sorted(p.relative_to(root) if p.is_relative_to(root) else p for p in seen)


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


def _load_weights_only(path: Path):
    """`torch.load(weights_only=True)`, also admitting numpy scalars and dtypes: training scripts often save
    `{"state_dict": ..., "best_acc": np.float64(...)}`, and a numpy scalar runs no code when unpickled."""
    import numpy as np
    allowed = [np.dtype, type(np.dtype("float64")), type(np.dtype("float32")), type(np.dtype("int64"))]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            allowed.append(importlib.import_module(module).scalar)
        except (ImportError, AttributeError):
            pass
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


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
            obj = _load_weights_only(path)
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
