"""Stage `evaluate`: accuracy through ONNX Runtime on the test split of every model the PQD report compares:
the recipe's steps, the counterpart student and the peers (`tasks.paths.compared_models`)."""
from __future__ import annotations

from distillery.core import tracking
from distillery.core.artifacts import write_json
from distillery.core.errors import run_stage
from distillery.core.params import load_section
from distillery.data import load_split
from distillery.onnx_export import onnx_accuracy
from tasks.paths import PREPARED, compared_models, metrics


def main() -> None:
    cfg = load_section("evaluate")
    x, y = load_split(PREPARED, "test")
    with tracking.stage_run("evaluate", cfg.model_dump()):
        results = {name: {"accuracy": onnx_accuracy(path, x, y, cfg.batch_size), "n": int(len(y))}
                   for name, path in compared_models().items()}
        write_json(metrics("evaluate"), results)
        tracking.log_metrics({f"{name}.accuracy": r["accuracy"] for name, r in results.items()})
        for name, r in results.items():
            print(f"evaluate: {name:<10} accuracy {100 * r['accuracy']:.2f} % on {r['n']} test images (ONNX Runtime)")


if __name__ == "__main__":
    run_stage(main)
