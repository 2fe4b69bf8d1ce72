"""`distillery params`: every key of the schema with its value from params.yaml and its description."""
from pathlib import Path

import yaml
from typer.testing import CliRunner

from distillery.core.params import SECTIONS
from flows.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_params_describes_every_key_with_its_value_and_bounds(monkeypatch):
    monkeypatch.chdir(ROOT)
    out = CliRunner().invoke(app, ["params", "distill"])
    assert out.exit_code == 0, out.output
    values = yaml.safe_load((ROOT / "params.yaml").read_text())["distill"]
    for key, field in SECTIONS["distill"].model_fields.items():
        assert f"  {key} = {values[key]!r}    # {field.description}" in out.output
    assert "temperature = 4.0" in out.output and "[> 0, <= 100]" in out.output


def test_every_key_of_the_schema_has_a_description_and_a_value_in_params_yaml():
    values = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, schema in SECTIONS.items():
        for key, field in schema.model_fields.items():
            assert field.description, f"{name}.{key} has no description"
            assert key in values[name] or not field.is_required(), f"{name}.{key} is missing from params.yaml"


def test_a_missing_key_is_named_with_its_description(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    del params["distill"]["temperature"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = CliRunner().invoke(app, ["validate", "--params", str(tmp_path / "params.yaml")])
    assert out.exit_code == 2
    assert "missing key distill.temperature (KD softmax temperature T)" in out.output
