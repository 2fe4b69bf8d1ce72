"""Stage `quantize`: INT8 quantization-aware training of the pruned model (or ORT static PTQ).

QAT: BatchNorm folded, fake-quant with a straight-through estimator (weights INT8 symmetric per
channel, activations UINT8 per tensor), ranges first calibrated on a seeded, hashed subset of
train, the pruning masks held fixed. PTQ: the checkpoint keeps the FP32 pruned model and the
calibration subset; `export` quantizes it with ONNX Runtime's static quantizer.
"""
from __future__ import annotations

import torch

from distillery.compress.checkpoint import load_compressed
from distillery.compress.qat import quantize_aware_train
from distillery.core import tracking
from distillery.core.artifacts import save_checkpoint, write_json
from distillery.core.errors import run_stage
from distillery.core.params import load_section
from distillery.core.resume import epoch_saver, load_resume, resume_file
from distillery.data import calibration_subset, input_shape, load_prepared
from distillery.training import FitConfig, accuracy
from tasks.paths import PREPARED, PRUNED, QUANTIZED, metrics


def main() -> None:
    cfg = load_section("quantize")
    meta, train, val, test = load_prepared(PREPARED)
    pruned, ckpt = load_compressed(PRUNED)
    calib_x, calib_hash = calibration_subset(train[0], cfg.calibration_size, cfg.seed)
    example = torch.zeros(input_shape(meta))
    with tracking.stage_run("quantize", cfg.model_dump(), recipe="pqd"):
        extra = {"shapes": ckpt["shapes"], "masks": ckpt["masks"], "input_shape": input_shape(meta),
                 "calibration_sha256": calib_hash, "calibration_x": torch.from_numpy(calib_x)}
        if cfg.method == "qat":
            state_path = resume_file("quantize", cfg.model_dump(), str(ckpt["metrics"]))
            model = quantize_aware_train(pruned, ckpt["masks"], train, val, calib_x, example,
                                         FitConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                                   patience=cfg.epochs, seed=cfg.seed),
                                         cfg.freeze_observers_epoch, state=load_resume(state_path, True),
                                         on_epoch=epoch_saver(state_path))
            state_path.unlink(missing_ok=True)
        else:
            model = pruned
        record = {"method": cfg.method, "val_acc": accuracy(model, *val), "test_acc_torch": accuracy(model, *test),
                  "calibration_size": len(calib_x)}
        save_checkpoint(QUANTIZED, model, ckpt["spec"], qat=cfg.method == "qat", metrics=record, **extra)
        write_json(metrics("quantize"), {**record, "calibration_sha256": calib_hash})
        tracking.log_metrics(record)
        tracking.set_tags({"calibration_sha256": calib_hash})
        print(f"quantize: {cfg.method}, val acc {record['val_acc']:.4f}, test acc (torch fake-quant) "
              f"{record['test_acc_torch']:.4f}; calibration subset sha256 {calib_hash[:12]} -> {QUANTIZED}")


if __name__ == "__main__":
    run_stage(main)
