"""Bring your own model and data: a user's CNN class in its own file, its saved state_dict, its own
train and test files, adopted as the teacher (`train.epochs: 0`) and compressed by `distillery run pqd`.

Real DVC repo, real MLflow, real ORT, the real command in a subprocess (its Prefect server included).
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from repos import init_git_dvc

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
MEAN, STD = 0.5, 0.5  # the user's own preprocessing: (x - 0.5) / 0.5 on pixels in [0, 1]


def load_user_class(path: Path):
    spec = importlib.util.spec_from_file_location("user_cnn_plain", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Net


def plain_accuracy(net, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((net.eval()(torch.from_numpy((x[:, None] - MEAN) / STD)).argmax(1).numpy() == y).mean())


@pytest.fixture(scope="module")
def user_project(tmp_path_factory):
    """The repo's pipeline plus what a user brings: models/net.py, models/net.pt, data/user/{train,test}.npz."""
    root = tmp_path_factory.mktemp("user") / "p"
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, root / name)
    for name in ("distillery", "tasks", "data/raw"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "models").mkdir()
    shutil.copy(Path(__file__).with_name("user_cnn.py"), root / "models/net.py")
    with np.load(ROOT / "data/raw/digits.npz") as f:
        x, y = f["x"].astype(np.float32), f["y"]
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:1400], order[1400:]
    (root / "data/user").mkdir(parents=True)
    np.savez(root / "data/user/train.npz", x=x[train], y=y[train])
    np.savez(root / "data/user/test.npz", x=x[test], y=y[test])
    torch.manual_seed(0)  # the user's own training, in plain PyTorch
    net = load_user_class(root / "models/net.py")()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    xt, yt = torch.from_numpy((x[train][:, None] - MEAN) / STD), torch.from_numpy(y[train])
    for _ in range(15):
        for i in range(0, len(yt), 64):
            opt.zero_grad()
            F.nll_loss(net.train()(xt[i:i + 64]), yt[i:i + 64]).backward()
            opt.step()
    torch.save(net.state_dict(), root / "models/net.pt")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prepare"].update(source="npz", path="data/user/train.npz", test_path="data/user/test.npz",
                             image_size=8, normalize={"mean": [MEAN], "std": [STD]})
    params["train"] = {**params["train"], "model": "models/net.py:Net", "model_kwargs": {},
                       "weights": "models/net.pt", "epochs": 0}
    params["prune"].update(finetune_epochs=2)
    params["quantize"].update(epochs=2, freeze_observers_epoch=1)
    params["distill"].update(epochs=2)
    params["benchmark"].update(warmup=5, runs=50, threads=[1], batch_runs=3, profile_runs=5)
    params["counterpart"]["enabled"] = False  # test_pipeline builds the counterpart; here the user's model matters
    params["baselines"]["peers"] = {"ort_u8s8": True, "ort_s8s8": False, "nncf": True, "olive": False}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    init_git_dvc(root)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "pqd", "--root", str(root)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, env, proc.stdout + proc.stderr, plain_accuracy(net, x[test], y[test])


def test_the_adopted_teacher_scores_in_ort_what_it_scores_in_plain_pytorch(user_project):
    root, _, out, plain = user_project
    assert "dvc.yaml: train deps + models/net.py, models/net.pt" in out
    train = json.loads((root / "metrics/train.json").read_text())
    assert train["adopted"] is True and train["epochs_run"] == 0
    assert "models/net.py (md5 " in train["source"]["code"] and "models/net.pt (md5 " in train["source"]["weights"]
    evaluate = json.loads((root / "metrics/evaluate.json").read_text())
    teacher_ort = evaluate["teacher"]["accuracy"]
    assert abs(teacher_ort - plain) <= 0.001, (teacher_ort, plain)
    assert plain > 0.9
    meta = json.loads((root / "data/prepared/meta.json").read_text())
    assert meta["counts"]["test"] == 397  # the user's own test file, not a carved share


def test_the_int8_student_stays_close_and_the_report_says_so(user_project):
    root, _, _, plain = user_project
    evaluate = json.loads((root / "metrics/evaluate.json").read_text())
    student = evaluate["distilled"]["accuracy"]
    assert student >= plain - 0.05, (student, plain)
    report = (root / "reports/pqd.md").read_text()
    assert "distilled" in report
    # the peers quantized the user's own network too, and are timed beside the student
    assert {"ort_u8s8", "nncf"} <= set(evaluate) and "| ort_s8s8 " in report and "off (baselines.peers)" in report


def test_lineage_names_the_users_files_and_editing_the_model_file_reruns_from_train(user_project):
    root, env, _, _ = user_project
    out = subprocess.run([sys.executable, "-m", "flows.cli", "lineage", "models/pqd/student.int8.onnx", "--root",
                          str(root)], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for needle in ("models/net.py", "models/net.pt", "data/user/train.npz", "data/user/test.npz"):
        assert needle in out.stdout, needle
    with open(root / "models/net.py", "a") as f:
        f.write("# the user edits their model's file\n")
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, capture_output=True, text=True,
                            timeout=120).stdout
    changed = {line.rstrip(":").strip() for line in status.splitlines() if line and not line.startswith((" ", "\t"))}
    assert {"train", "prune", "quantize", "distill", "export"} <= changed, status
    assert "prepare" not in changed, status
