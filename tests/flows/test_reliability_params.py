"""Bad input stops `distillery run` before any work: one clear message, exit 2, no traceback, nothing written.

Every case goes through the real CLI app (typer's runner, in this process, so 30 cases cost
seconds); a few go through `python -m flows.cli` in a subprocess as a user would start it.
"""
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import distillery.models  # noqa: F401  (torch's import is paid once here, not by the first case)
import tasks.prepare  # noqa: F401
from flows.cli import app

ROOT = Path(__file__).resolve().parents[2]
GOOD = {
    "prepare": {"source": "npz", "path": "data/raw/digits.npz", "image_size": 8},
    "train": {"model": "toy", "model_kwargs": {}, "epochs": 2},
}


def make_project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    (root / "data" / "raw").mkdir(parents=True)
    shutil.copy(ROOT / "data/raw/digits.npz", root / "data/raw/digits.npz")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    write_params(root, GOOD)
    return root


def write_params(root: Path, patch) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, section in patch.items():
        if section is None:
            params.pop(name, None)
        elif isinstance(section, dict):
            params[name] = {**params.get(name, {}), **section}
        else:
            params[name] = section
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def npz(root: Path, name: str = "bad.npz", **arrays) -> None:
    np.savez(root / "data/raw" / name, **arrays)


def img_x(n: int = 30) -> np.ndarray:
    return np.random.default_rng(0).random((n, 8, 8), dtype=np.float32)


def labels(n: int = 30, k: int = 3) -> np.ndarray:
    return np.arange(n) % k


BAD_NPZ = {"source": "npz", "path": "data/raw/bad.npz"}


def folders(root: Path, *classes: str) -> None:
    for c in classes:
        (root / "data/raw/imgs" / c).mkdir(parents=True)


NET = {"model": "models/net.py:build", "model_kwargs": {"pixels": 256}}  # 16x16 digits, as in params.yaml


def user_net(root: Path) -> None:
    (root / "models").mkdir(exist_ok=True)
    shutil.copy(Path(__file__).with_name("user_net.py"), root / "models/net.py")


def user_weights(root: Path, rename=False, num_classes=10, name="w.pt", pickled_module=False, wrap=None) -> None:
    import importlib.util
    import torch
    user_net(root)
    spec = importlib.util.spec_from_file_location("user_net_for_weights", root / "models/net.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.build(num_classes=num_classes, pixels=256)
    state = {k.replace("fc1", "layer1") if rename else k: v for k, v in net.state_dict().items()}
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, str(root / "models" / name))
        return
    obj = {"state_dict": state, "head": torch.nn.Linear(2, 2)} if pickled_module else {wrap: {"lr": 0.1}} if wrap else state
    torch.save(obj, root / "models" / name)


# id -> (params patch, setup(root) or None, needles that must all appear in the message)
CASES = {
    "unknown-key": ({"train": {"epocs": 3}}, None, ["unknown key train.epocs", "did you mean 'epochs'", "allowed keys"]),
    "misspelt-section": ({"trian": {"epochs": 3}}, None, ["unknown section 'trian'", "did you mean 'train'"]),
    "wrong-type-int": ({"train": {"epochs": "ten"}}, None, ["train.epochs = 'ten'", "integer"]),
    "wrong-type-float-as-str": ({"train": {"lr": "0.1"}}, None, ["train.lr = '0.1'", "number"]),
    "epochs-negative": ({"train": {"epochs": -1}}, None, ["train.epochs = -1", "greater than or equal to 0"]),
    "sparsity-1.5": ({"prune": {"sparsity": 1.5}}, None, ["prune.sparsity = 1.5", "less than 1"]),
    "negative-temperature": ({"distill": {"temperature": -2.0}}, None, ["distill.temperature = -2.0", "greater than 0"]),
    "alpha-above-1": ({"distill": {"alpha": 2.0}}, None, ["distill.alpha = 2.0", "less than or equal to 1"]),
    "batch-size-zero": ({"train": {"batch_size": 0}}, None, ["train.batch_size = 0", "greater than or equal to 1"]),
    "image-size-2": ({"prepare": {"image_size": 2}}, None, ["prepare.image_size = 2", "greater than or equal to 4"]),
    "test-ratio-1.5": ({"prepare": {"test_ratio": 1.5}}, None, ["prepare.test_ratio = 1.5", "less than 0.5"]),
    "unknown-model": ({"train": {"model": "resnet1000"}}, None, ["train.model = 'resnet1000'", "not a zoo model", "resnet18"]),
    "zoo-model-bad-kwarg": ({"train": {"model_kwargs": {"widht": 2}}}, None, ["train.model_kwargs", "widht"]),
    # the user's own model (tests/flows/user_net.py copied in as models/net.py) and weights
    "factory-file-missing": ({"train": {"model": "models/nope.py:build"}}, user_net,
                             ["train.model = 'models/nope.py:build'", "does not exist"]),
    "factory-function-missing": ({"train": {"model": "models/net.py:biuld"}}, user_net,
                                 ["train.model = 'models/net.py:biuld'", "has no 'biuld'", "did you mean build"]),
    "factory-module-missing": ({"train": {"model": "nosuchpkg.nets:build"}}, None,
                               ["train.model = 'nosuchpkg.nets:build'", "cannot import nosuchpkg.nets"]),
    "factory-bad-kwargs": ({"train": {**NET, "model_kwargs": {"classes": 10}}}, user_net,
                           ["calling it with train.model_kwargs = {'classes': 10} failed", "TypeError"]),
    "factory-returns-no-module": ({"train": {**NET, "model": "models/net.py:not_a_model", "model_kwargs": {}}}, user_net,
                                  ["returned a dict, not a torch.nn.Module"]),
    "model-outputs-other-classes": ({"train": {**NET, "model_kwargs": {"num_classes": 5, "pixels": 256}}},
                                    user_net, ["outputs shape (2, 5)", "the data has 10 classes", "train.model_kwargs to 10"]),
    "model-wrong-input-size": ({"train": NET, "prepare": {"image_size": 8}}, user_net,
                               ["fails on a batch of the prepared images, shape (2, 1, 8, 8)", "prepare.image_size"]),
    "model-not-traceable-for-qat": ({"train": {**NET, "model": "models/net.py:branchy"}}, user_net,
                                    ["torch.fx cannot trace", "Branchy", "data-dependent Python control flow"]),
    "adopt-without-weights": ({"train": {**NET, "epochs": 0}}, user_net,
                              ["train.epochs = 0 adopts", "needs train.weights"]),
    "weights-missing-file": ({"train": {**NET, "weights": "models/nope.pt"}}, user_net,
                             ["train.weights = 'models/nope.pt'", "does not exist"]),
    "weights-wrong-keys": ({"train": {**NET, "weights": "models/w.pt"}},
                           lambda r: user_weights(r, rename=True), ["models/w.pt", "does not fit the model",
                                                                     "missing key(s) ['fc1.weight'", "unexpected key(s) ['layer1.weight'"]),
    "weights-wrong-shapes": ({"train": {**NET, "weights": "models/w.safetensors"}},
                             lambda r: user_weights(r, num_classes=5, name="w.safetensors"),
                             ["models/w.safetensors", "shape mismatch", "fc2.weight (5, 32) vs (10, 32)"]),
    "weights-unsafe-pickle": ({"train": {**NET, "weights": "models/w.pt"}},
                              lambda r: user_weights(r, pickled_module=True), ["models/w.pt", "unsafe unpickling",
                                                                                "state_dict"]),
    "weights-not-a-state-dict": ({"train": {**NET, "weights": "models/w.pt"}},
                                 lambda r: user_weights(r, wrap="optimizer"), ["models/w.pt", "no state_dict found"]),
    "unknown-source": ({"prepare": {"source": "parquet"}}, None, ["prepare.source = 'parquet'", "'digits'", "'npz'"]),
    "unknown-quantize-method": ({"quantize": {"method": "int4"}}, None, ["quantize.method = 'int4'", "'qat'", "'ptq'"]),
    "opset-too-old": ({"export": {"opset": 7}}, None, ["export.opset = 7", "greater than or equal to 13"]),
    "negative-threads": ({"benchmark": {"threads": [-1]}}, None, ["benchmark.threads", ">= 0"]),
    "section-is-list": ({"train": [1, 2]}, None, ["section 'train' must be a mapping", "[1, 2]"]),
    "path-does-not-exist": ({"prepare": {"path": "data/raw/nope.npz"}}, None,
                            ["prepare.path = 'data/raw/nope.npz'", "does not exist"]),
    "path-required": ({"prepare": {"source": "npz", "path": None}}, None,
                      ["prepare.path is required", "prepare.source = 'npz'", ".npz file"]),
    "npz-source-folder-path": ({"prepare": {"source": "npz", "path": "data/raw"}}, None,
                               ["prepare.path = 'data/raw' is a folder", "prepare.source = 'npz'", ".npz file"]),
    "imagefolder-source-file-path": ({"prepare": {"source": "imagefolder", "path": "data/raw/digits.npz"}}, None,
                                     ["prepare.path = 'data/raw/digits.npz' is a file", "'imagefolder'", "sub-folder per class"]),
    "empty-data-set": ({"prepare": BAD_NPZ}, lambda r: npz(r, x=np.zeros((0, 8, 8), np.float32), y=np.zeros(0, np.int64)),
                       ["data/raw/bad.npz", "empty"]),
    "labels-not-matching-classes": ({"prepare": BAD_NPZ}, lambda r: npz(r, x=img_x(), y=labels(k=6), classes=np.array(["a", "b", "c"])),
                                    ["data/raw/bad.npz", "label 5 is out of range for 3 classes", "0..2"]),
    "x-is-1d": ({"prepare": BAD_NPZ}, lambda r: npz(r, x=np.zeros(30, np.float32), y=labels()),
                ["data/raw/bad.npz", "'x' has shape (30,)", "(N,H,W)"]),
    "x-is-not-numeric": ({"prepare": BAD_NPZ}, lambda r: npz(r, x=np.full((30, 8, 8), "a"), y=labels()),
                         ["data/raw/bad.npz", "'x' has shape (30, 8, 8)", "numeric images"]),
    "negative-labels": ({"prepare": BAD_NPZ}, lambda r: npz(r, x=img_x(), y=labels() - 1),
                        ["data/raw/bad.npz", "label -1 is negative", "0..n_classes-1"]),
    "float-labels": ({"prepare": BAD_NPZ}, lambda r: npz(r, x=img_x(), y=labels().astype(np.float32)),
                     ["data/raw/bad.npz", "1-D integer", "float32"]),
    "one-label-per-image": ({"prepare": BAD_NPZ}, lambda r: npz(r, x=img_x(30), y=labels(20)),
                            ["data/raw/bad.npz", "30 images but 20 labels"]),
    "single-class": ({"prepare": BAD_NPZ}, lambda r: npz(r, x=img_x(), y=np.zeros(30, np.int64)),
                     ["data/raw/bad.npz", "only 1 class", "at least 2"]),
    "npz-lacks-y": ({"prepare": BAD_NPZ}, lambda r: npz(r, x=img_x()), ["data/raw/bad.npz", "lacks array(s) ['y']"]),
    "npz-wrong-format": ({"prepare": BAD_NPZ}, lambda r: (r / "data/raw/bad.npz").write_text("x,y\n1,2\n"),
                         ["data/raw/bad.npz", "not a readable NPZ file", "numpy.savez"]),
    "imagefolder-one-class": ({"prepare": {"source": "imagefolder", "path": "data/raw/imgs"}}, lambda r: folders(r, "cat"),
                              ["data/raw/imgs", "1 class sub-folder", "at least 2"]),
    "imagefolder-class-without-images": ({"prepare": {"source": "imagefolder", "path": "data/raw/imgs"}},
                                         lambda r: folders(r, "cat", "dog"), ["imgs/cat", "without images"]),
    "idx-folder-without-files": ({"prepare": {"source": "idx", "path": "data/raw"}}, None,
                                 ["data/raw", "no '*images-idx3-ubyte' files"]),
}
def diffusers_folder(root: Path, name: str) -> None:
    (root / "m").mkdir()
    (root / "m/config.json").write_text('{"_class_name": "%s", "_diffusers_version": "0.42.1"}' % name)


CASES.update({  # PPCL on a user's folder
    "ppcl-folder-missing": ({"ppcl_teacher": {"model": "nope", "inputs": "in.pt"}}, None,
                            ["ppcl_teacher.model = 'nope'", "not found", "subfolder"]),
    "ppcl-folder-without-inputs": ({"ppcl_teacher": {"model": "m"}}, None,
                                   ["ppcl_teacher", "inputs", "capture file"]),
    "ppcl-unsupported-class": ({"ppcl_teacher": {"model": "m", "inputs": "in.pt"}},
                               lambda r: diffusers_folder(r, "UNet2DConditionModel"),
                               ["UNet2DConditionModel has no PPCL adapter", "SD3Transformer2DModel"]),
    "ppcl-inputs-missing": ({"ppcl_teacher": {"model": "m", "inputs": "in.pt"}},
                            lambda r: diffusers_folder(r, "SD3Transformer2DModel"),
                            ["ppcl_teacher.inputs = 'in.pt'", "file not found", "capture"]),
    "ppcl-device-typo": ({"ppcl_teacher": {"device": "gpu"}}, None, ["ppcl_teacher.device", "gpu"]),
})
RAW_FILE_CASES = {  # the params file itself is broken
    "yaml-syntax-error": ("train:\n  epochs: [3\n", ["params.yaml", "not valid YAML"]),
    "params-is-a-list": ("- train\n- prune\n", ["params.yaml", "expected a mapping of sections, got list"]),
}


def invoke(root: Path, monkeypatch, *args: str):
    monkeypatch.chdir(root)  # `run` changes into the project; monkeypatch changes back
    before = listing(root)
    start = time.perf_counter()
    result = CliRunner().invoke(app, list(args))
    elapsed = time.perf_counter() - start
    return result, before, elapsed


def assert_rejected(root: Path, result, before, elapsed, needles) -> None:
    out = result.output
    assert result.exit_code == 2, out
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a crash
    assert "Traceback" not in out
    assert out.startswith("error: ") and out.count("error: ") == 1, out
    for needle in needles:
        assert needle in out, f"{needle!r} not in {out!r}"
    assert listing(root) == before, "the rejected run wrote into the project"


@pytest.mark.parametrize("case", CASES)
def test_bad_params_and_data_stop_the_run_before_any_work(tmp_path, monkeypatch, case):
    patch, setup, needles = CASES[case]
    root = make_project(tmp_path)
    write_params(root, patch)
    if setup:
        setup(root)
    recipe = "ppcl" if case.startswith("ppcl") else "pqd"
    result, before, elapsed = invoke(root, monkeypatch, "run", recipe, "--root", str(root))
    assert_rejected(root, result, before, elapsed, needles)
    assert not (root / ".prefect").exists() and not (root / "mlflow.db").exists()


@pytest.mark.parametrize("case", RAW_FILE_CASES)
def test_a_broken_params_file_stops_the_run(tmp_path, monkeypatch, case):
    text, needles = RAW_FILE_CASES[case]
    root = make_project(tmp_path)
    (root / "params.yaml").write_text(text)
    result, before, elapsed = invoke(root, monkeypatch, "run", "pqd", "--root", str(root))
    assert_rejected(root, result, before, elapsed, needles)


def test_a_missing_params_file_and_an_unknown_recipe_are_named(tmp_path, monkeypatch):
    root = make_project(tmp_path)
    result, before, elapsed = invoke(root, monkeypatch, "run", "pdq", "--root", str(root))
    assert_rejected(root, result, before, elapsed, ["unknown recipe 'pdq'", "pqd"])
    (root / "params.yaml").unlink()
    result, before, elapsed = invoke(root, monkeypatch, "run", "pqd", "--root", str(root))
    assert_rejected(root, result, before, elapsed, ["params.yaml: file not found"])


def test_validate_runs_the_data_check_too(tmp_path, monkeypatch):
    root = make_project(tmp_path)
    result, before, elapsed = invoke(root, monkeypatch, "validate")
    assert result.exit_code == 0 and "params.yaml: ok" in result.output
    write_params(root, {"prepare": BAD_NPZ})
    npz(root, x=np.zeros(30, np.float32), y=labels())
    result, before, elapsed = invoke(root, monkeypatch, "validate")
    assert_rejected(root, result, before, elapsed, ["data/raw/bad.npz", "'x' has shape (30,)"])


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from distillery.core.errors import ParamsError
    root = make_project(tmp_path)
    write_params(root, {"prune": {"sparsity": 1.5}})
    result, _, _ = invoke(root, monkeypatch, "run", "pqd", "--root", str(root), "--debug")
    assert isinstance(result.exception, ParamsError) and "prune.sparsity = 1.5" in str(result.exception)


@pytest.mark.parametrize("patch, setup, needles", [
    ({"prune": {"sparsity": 1.5}}, None, ["prune.sparsity = 1.5", "less than 1"]),
    ({"prepare": BAD_NPZ}, lambda r: npz(r, x=img_x(), y=labels(k=6), classes=np.array(["a", "b", "c"])),
     ["data/raw/bad.npz", "out of range for 3 classes"]),
], ids=["params", "data"])
def test_the_installed_command_rejects_bad_input_in_a_subprocess(tmp_path, patch, setup, needles):
    root = make_project(tmp_path)
    write_params(root, patch)
    if setup:
        setup(root)
    before = listing(root)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "pqd", "--root", str(root)],
                          capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.count("error: ") == 1 and all(n in proc.stderr for n in needles), proc.stderr
    assert "prefect" not in (proc.stdout + proc.stderr).lower()  # stopped before Prefect started
    assert listing(root) == before
    assert elapsed < 60, f"{elapsed:.1f}s: validation should cost only the imports"
