"""Real git + DVC repositories for tests, and an MLflow store inside them."""
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def init_git_dvc(root: Path) -> Path:
    """`git init`, `dvc init` and one commit of everything already in `root`."""
    env = {**os.environ, **GIT_ENV}
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=root, check=True, env=env)
    return root


@contextlib.contextmanager
def tracked_in(root: Path) -> Iterator[Path]:
    """MLflow pointed at `root/mlflow.db` for a whole test module; the working directory restored after."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    cwd = os.getcwd()
    try:
        yield root
    finally:
        os.chdir(cwd)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
