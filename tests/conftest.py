"""Shared fixtures: every test runs with telemetry off and its MLflow store in tmp_path."""
import os

import pytest

os.environ.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1"})
# Tiny test models gain nothing from a second thread, and two busy processes each spinning two
# OpenMP threads on a two-core machine slow each other down several-fold.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A real SQLite MLflow store in tmp_path, used through MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri
