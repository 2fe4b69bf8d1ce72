"""Anything the project starts listens on 127.0.0.1 only: Prefect's temporary server, the commands the README gives."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_cli_keeps_prefects_temporary_server_on_localhost(tmp_path):
    probe = ("import os; from pathlib import Path; from flows.cli import embedded_defaults; "
             "embedded_defaults(Path(os.environ['PROBE_ROOT'])); "
             "from prefect.settings import get_current_settings; from prefect.server.api.server import SubprocessASGIServer; "
             "s = get_current_settings(); print(s.server.api.host, s.server.ephemeral.startup_timeout_seconds); "
             "print(SubprocessASGIServer().address)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "PROBE_ROOT": str(tmp_path)}, capture_output=True,
                         text=True, check=True, timeout=120).stdout.split("\n")
    host, timeout = out[0].split()
    assert host == "127.0.0.1" and int(timeout) >= 60
    assert out[1].startswith("http://127.0.0.1:")


def test_every_server_command_in_the_readme_binds_to_localhost():
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"(?:mlflow (?:ui|server)|prefect server start|dvc exp show --html)[^`\n]*", text)
    assert any(c.startswith("mlflow ui") for c in commands) and any(c.startswith("prefect server start") for c in commands)
    for command in commands:
        if command.startswith(("mlflow", "prefect")):
            assert "--host 127.0.0.1" in command, command
    assert "0.0.0.0" not in text
