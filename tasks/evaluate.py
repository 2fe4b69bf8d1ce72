"""Stage `evaluate`: accuracy of every deployed ONNX model through ONNX Runtime on the test split."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.artifacts import write_json
from tasks.config import load_section
from tasks.data import load_split
from tasks.errors import run_stage
from tasks.export import DEPLOYED
from tasks.pqd_io import PREPARED
from tasks.onnx_export import run_onnx

METRICS = Path("metrics/evaluate.json")


def evaluate(paths: dict[str, Path], x: np.ndarray, y: np.ndarray, batch_size: int) -> dict[str, dict]:
    """Top-1 accuracy (in [0, 1]) of each ONNX model on (x, y)."""
    out = {}
    for name, path in paths.items():
        pred = run_onnx(path, x, batch_size).argmax(1)
        out[name] = {"accuracy": float((pred == y).mean()), "n": int(len(y))}
    return out


def main() -> None:
    from tasks import tracking
    cfg = load_section("evaluate")
    x, y = load_split(PREPARED, "test")
    with tracking.stage_run("evaluate", cfg.model_dump()):
        results = evaluate(DEPLOYED, x, y, cfg.batch_size)
        write_json(METRICS, results)
        tracking.log_metrics({f"{name}.accuracy": r["accuracy"] for name, r in results.items()})
        for name, r in results.items():
            print(f"evaluate: {name:<10} accuracy {100 * r['accuracy']:.2f} % on {r['n']} test images (ONNX Runtime)")


if __name__ == "__main__":
    run_stage(main)
