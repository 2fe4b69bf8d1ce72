"""Stage `ablation@<order>`: one order of prune / quantize / distill, every seed, as sparse INT8 ONNX.

`python -m tasks.ablation pqd` reads `ablation` with `ablation.orders.pqd`'s overrides applied,
runs the library's chain (`distillery.compress.chain.run_order`, the same steps the PQD stages
call) from the teacher once per seed, and writes `models/ablation/pqd/seed<k>.int8.onnx` and
`metrics/ablation/pqd.json` (ORT test accuracy, sparsity, INT8 initialisers per seed).
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import fields

import numpy as np
import torch

from distillery.compress.chain import ChainConfig, quantized_sparsity, run_order
from distillery.compress.qat import export_int8_onnx, int8_initializers
from distillery.core import tracking
from distillery.core.artifacts import write_json
from distillery.core.errors import DistilleryError, run_stage
from distillery.core.params import load_section
from distillery.data import calibration_subset, input_shape, load_prepared
from distillery.models import load_model
from distillery.onnx_export import onnx_accuracy
from distillery.training import accuracy
from tasks.paths import ABLATION, ABLATION_METRICS, PREPARED, TEACHER, ablation_model


def main() -> None:
    if len(sys.argv) != 2:
        raise DistilleryError("usage: python -m tasks.ablation <order>")
    order = sys.argv[1]
    cfg = load_section("ablation").for_order(order)
    opset = load_section("export").opset
    chain = ChainConfig(**{f.name: getattr(cfg, f.name) for f in fields(ChainConfig) if f.name in type(cfg).model_fields})
    meta, train, val, (x_test, y_test) = load_prepared(PREPARED)
    teacher, _ = load_model(TEACHER)
    example = torch.zeros(input_shape(meta))
    shutil.rmtree(ABLATION / order, ignore_errors=True)  # as `dvc repro` would: no file of an earlier run survives
    params = {"order": order, **cfg.model_dump(exclude={"orders", "warmup", "runs"})}
    with tracking.stage_run(f"ablation@{order}", {}, recipe="ablation"):  # '@' is not allowed in MLflow param keys
        tracking.log_params({f"ablation.{k}": v for k, v in params.items()})
        record = {}
        for seed in range(cfg.seeds):
            calib_x, calib_hash = calibration_subset(train[0], cfg.calibration_size, seed)
            model = run_order(teacher, order, chain, train, val, calib_x, example, seed)
            path = export_int8_onnx(model, example, ablation_model(order, seed), opset)
            row = record[f"seed{seed}"] = {"seed": seed, "val_acc_torch": accuracy(model, *val),
                                           "test_acc": onnx_accuracy(path, x_test, y_test),
                                           "sparsity": quantized_sparsity(model), "size_bytes": path.stat().st_size,
                                           "int8_weight_initializers": len(int8_initializers(path)),
                                           "calibration_sha256": calib_hash}
            print(f"ablation@{order}: seed {seed}: test acc (ORT) {100 * row['test_acc']:.2f} %, "
                  f"sparsity {row['sparsity']:.3f} -> {path}")
        accs = [r["test_acc"] for r in record.values()]
        summary = {"order": order, "seeds": record, "test_acc_mean": float(np.mean(accs)),
                   "test_acc_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0}
        write_json(ABLATION_METRICS / f"{order}.json", summary)
        tracking.log_metrics({k: v for k, v in summary.items() if k != "seeds"} |
                             {f"seed{r['seed']}.{k}": v for r in record.values() for k, v in r.items() if k != "seed"})


if __name__ == "__main__":
    run_stage(main)
