"""The files params.yaml names (the user's data, weights and model code) become deps of the stages that read them."""
import shutil
from pathlib import Path

import yaml

from distillery.core.params import load_params
from flows.user_deps import sync

ROOT = Path(__file__).resolve().parents[2]


def project(tmp_path: Path, train: dict, prepare: dict | None = None) -> Path:
    root = tmp_path / "p"
    (root / "models").mkdir(parents=True)
    (root / "data/raw").mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(ROOT / "data/raw/digits.npz", root / "data/raw/digits.npz")
    (root / "models/layers.py").write_text("import torch.nn as nn\n")
    (root / "models/net.py").write_text("import torch.nn as nn\nfrom layers import nn as _\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(256, 10))\n")
    (root / "models/net.pt").write_bytes(b"")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(train)
    params["prepare"].update(prepare or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def deps(root: Path) -> dict[str, list[str]]:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {name: st.get("do", st)["deps"] for name, st in stages.items()}


def test_a_factory_file_its_imports_and_the_weights_become_deps_and_go_again(tmp_path, monkeypatch):
    outside = tmp_path / "photos.npz"
    shutil.copy(ROOT / "data/raw/digits.npz", outside)
    root = project(tmp_path, {"model": "models/net.py:build", "model_kwargs": {}, "weights": "models/net.pt"},
                   {"source": "npz", "path": str(outside)})
    monkeypatch.chdir(root)
    before = deps(root)
    comment = "# The one definition of the pipeline"
    lines = sync(root, load_params(root / "params.yaml"))
    after = deps(root)
    assert any(line.startswith("dvc.yaml: train deps + models/layers.py, models/net.py, models/net.pt") for line in lines), lines
    assert after["train"][-3:] == ["models/layers.py", "models/net.py", "models/net.pt"]
    checkpoints = {"models/teacher.pt", "models/pqd/pruned.pt", "models/pqd/quantized.pt", "models/pqd/distilled.pt"}
    rebuild_teacher = [name for name, d in before.items() if checkpoints & set(d) and name != "train"]
    assert {"prune", "quantize", "distill", "export", "ablation", "ablation_report"} <= set(rebuild_teacher)
    for stage in rebuild_teacher:  # every stage that rebuilds the teacher's architecture runs the user's code
        assert after[stage] == before[stage] + ["models/layers.py", "models/net.py"], stage
    assert after["prepare"][-1] == str(outside.resolve())  # data outside the project: an external dep
    for stage in set(before) - set(rebuild_teacher) - {"train", "prepare"}:
        assert after[stage] == before[stage], stage
    assert (root / "dvc.yaml").read_text().startswith(comment)  # comments kept
    assert sync(root, load_params(root / "params.yaml")) == []  # in line: nothing to do, nothing written

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(model="toy", weights=None)
    params["prepare"].update(path="data/raw/digits.npz")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    lines = sync(root, load_params(root / "params.yaml"))
    assert deps(root) == before, lines  # back to the zoo and the bundled data: the user entries are gone


def test_validate_reports_pending_deps_without_writing(tmp_path, monkeypatch):
    from typer.testing import CliRunner
    from flows.cli import app
    root = project(tmp_path, {"model": "models/net.py:build", "model_kwargs": {}, "epochs": 1})
    monkeypatch.chdir(root)
    text = (root / "dvc.yaml").read_text()
    result = CliRunner().invoke(app, ["validate", "--params", str(root / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "train deps + models/layers.py, models/net.py  (pending" in result.output
    assert (root / "dvc.yaml").read_text() == text


def test_only_the_deps_lists_of_changed_stages_are_rewritten(tmp_path, monkeypatch):
    root = project(tmp_path, {"model": "models/net.py:build", "model_kwargs": {}})
    monkeypatch.chdir(root)
    old = (root / "dvc.yaml").read_text().splitlines()
    sync(root, load_params(root / "params.yaml"))
    new = (root / "dvc.yaml").read_text().splitlines()
    changed = [line for line in new if line not in old]
    assert changed and all("deps:" in line or line.startswith(" " * 11) for line in changed), changed
    assert [line for line in old if "metrics:" in line or "#" in line] == \
        [line for line in new if "metrics:" in line or "#" in line]  # comments and other keys untouched
