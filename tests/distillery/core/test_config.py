import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distillery.core.params import SECTIONS, load_params, load_section
from distillery.core.errors import ParamsError

ROOT = Path(__file__).resolve().parents[3]


def write(tmp_path, **sections):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, patch in sections.items():
        if patch is None:
            params.pop(name)
        elif isinstance(patch, dict):
            params[name] = {**params.get(name, {}), **patch}
        else:
            params[name] = patch
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_default_params_validate(monkeypatch):
    monkeypatch.chdir(ROOT)
    configs = load_params(ROOT / "params.yaml")
    assert set(configs) == set(SECTIONS)
    assert configs["train"].model == "resnet18"


@pytest.mark.parametrize("patch, needles", [
    ({"train": {"epocs": 3}}, ["unknown key train.epocs", "did you mean 'epochs'"]),
    ({"trian": {"epochs": 3}}, ["unknown section 'trian'", "did you mean 'train'"]),
    ({"train": {"epochs": "ten"}}, ["train.epochs = 'ten'", "integer"]),
    ({"train": {"epochs": 0}}, ["train.epochs = 0 adopts a trained model", "needs train.weights"]),
    ({"prepare": {"path": "no/such/file.npz"}}, ["prepare.path", "does not exist"]),
    ({"prepare": {"source": "parquet"}}, ["prepare.source = 'parquet'", "'digits'"]),
    ({"benchmark": {"threads": [-1]}}, ["benchmark.threads", ">= 0"]),
    ({"prepare": {"test_ratio": 1.5}}, ["prepare.test_ratio = 1.5", "less than 0.5"]),
    ({"train": [1, 2]}, ["section 'train' must be a mapping"]),
])
def test_bad_params_name_key_value_and_what_is_allowed(tmp_path, monkeypatch, patch, needles):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, **patch))
    for needle in needles:
        assert needle in str(err.value)


def test_a_stage_reads_only_its_section(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = write(tmp_path, train={"epochs": 0})
    assert load_section("benchmark", path).runs > 0  # a broken train section does not stop benchmark
    with pytest.raises(ParamsError):
        load_section("train", path)


def test_cli_rejects_bad_params_before_any_work_without_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  epochs: -3\n  colour: blue\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "pqd", "--root", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "train.epochs = -3" in proc.stderr and "unknown key train.colour" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
