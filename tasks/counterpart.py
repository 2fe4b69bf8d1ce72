"""Stage `counterpart`: P->Q->D once more with the other pruning method, so one report shows both.

With `prune.method: unstructured` (the paper: zeros, INT8 brings the speed) this builds the structured
student (channels removed: fewer MACs), and the other way round. It runs the library's chain
(`distillery.compress.chain.run_order`, the steps the prune / quantize / distill stages call) from the
teacher with the prune, quantize and distill settings: the method's share, fine-tune, QAT (also when
`quantize.method: ptq`) and KD epochs and rates, `quantize.batch_size` for every step, `prune.seed`.
Writes `models/pqd/counterpart/<method>.int8.onnx` (nothing when `counterpart.enabled` is false) and
`metrics/counterpart.json`.
"""
from __future__ import annotations

import shutil

import torch

from distillery.compress.chain import ChainConfig, quantized_sparsity, run_order
from distillery.compress.qat import export_int8_onnx, int8_initializers
from distillery.core import tracking
from distillery.core.artifacts import write_json
from distillery.core.errors import run_stage
from distillery.core.params import load_section
from distillery.data import calibration_subset, input_shape, load_prepared
from distillery.models import load_model
from distillery.training import accuracy
from tasks.paths import COUNTERPART, PREPARED, TEACHER, counterpart_model, metrics


def main() -> None:
    cfg = load_section("counterpart")
    prune, quant, kd = load_section("prune"), load_section("quantize"), load_section("distill")
    opset = load_section("export").opset
    method = "structured" if prune.method == "unstructured" else "unstructured"
    shutil.rmtree(COUNTERPART, ignore_errors=True)  # as `dvc repro` would: nothing of an earlier run survives
    COUNTERPART.mkdir(parents=True)
    if not cfg.enabled:
        with tracking.stage_run("counterpart", {"enabled": False}, recipe="pqd"):  # recorded as run, like any stage
            write_json(metrics("counterpart"), {"enabled": False})
            print("counterpart: off (counterpart.enabled: false)")
        return
    chain = ChainConfig(method=method, sparsity=prune.sparsity, ratio=prune.ratio, round_to=prune.round_to,
                        prune_epochs=prune.finetune_epochs,
                        qat_epochs=quant.epochs, kd_epochs=kd.epochs, prune_lr=prune.lr, qat_lr=quant.lr, kd_lr=kd.lr,
                        batch_size=quant.batch_size, temperature=kd.temperature, alpha=kd.alpha,
                        freeze_observers_epoch=quant.freeze_observers_epoch)
    meta, train, val, test = load_prepared(PREPARED)
    teacher, _ = load_model(TEACHER)
    example = torch.zeros(input_shape(meta))
    calib_x, calib_hash = calibration_subset(train[0], quant.calibration_size, quant.seed)
    params = {"enabled": True, "method": method, **{k: v for k, v in vars(chain).items() if k != "method"},
              "seed": prune.seed}
    with tracking.stage_run("counterpart", params, recipe="pqd"):
        share = chain.sparsity if method == "unstructured" else chain.ratio
        print(f"counterpart: P->Q->D with {method} pruning ({share})")
        model = run_order(teacher, "pqd", chain, train, val, calib_x, example, seed=prune.seed)
        path = export_int8_onnx(model, example, counterpart_model(method), opset)
        record = {"enabled": True, "method": method, "val_acc_torch": accuracy(model, *val),
                  "test_acc_torch": accuracy(model, *test), "sparsity": quantized_sparsity(model),
                  "int8_weight_initializers": len(int8_initializers(path)), "calibration_sha256": calib_hash}
        write_json(metrics("counterpart"), record)
        tracking.log_metrics(record)
        tracking.log_onnx_model(path, f"distilled_{method}")
        print(f"counterpart: {method}: val acc {record['val_acc_torch']:.4f} (torch fake-quant) -> {path}")


if __name__ == "__main__":
    run_stage(main)
