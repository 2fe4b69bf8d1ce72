"""Stage `quantize`: INT8 quantization-aware training of the pruned model (or ORT static PTQ).

QAT: BatchNorm folded, fake-quant with a straight-through estimator (weights INT8 symmetric per
channel, activations UINT8 per tensor), ranges first calibrated on a seeded, hashed subset of
train, the pruning masks held fixed. PTQ: the checkpoint keeps the FP32 pruned model and the
calibration subset; `export` quantizes it with ONNX Runtime's static quantizer.
"""
from __future__ import annotations

import torch

from tasks.artifacts import load_model, save_checkpoint, write_json
from tasks.compress.qat import calibrate, freeze_observers, prepare_qat
from tasks.config import QuantizeConfig, load_section
from tasks.errors import run_stage
from tasks.pqd_io import PRUNED, QUANTIZED, calibration_subset, input_shape, load_data
from tasks.resume import epoch_saver, load_resume, resume_file
from tasks.training import FitConfig, accuracy, fit


def quantize_aware_train(pruned: torch.nn.Module, mask: dict, cfg: QuantizeConfig, train: tuple, val: tuple,
                         calib_x, example: torch.Tensor, state: dict | None = None, on_epoch=None) -> torch.nn.Module:
    """Fold BN, insert fake-quant, calibrate ranges, then train with the masks fixed.

    Activation ranges follow the data until epoch `freeze_observers_epoch`, then stay put.
    """
    model = prepare_qat(pruned, example, mask or None)
    calibrate(model, torch.from_numpy(calib_x))
    done = len(state["history"]) if state is not None else 0
    if done >= cfg.freeze_observers_epoch:
        freeze_observers(model)

    def freeze_when_due(epoch: int, m: torch.nn.Module, resume_state: dict, hist) -> None:
        if on_epoch is not None:
            on_epoch(epoch, m, resume_state, hist)
        if epoch + 1 >= cfg.freeze_observers_epoch:
            freeze_observers(m)
    if cfg.epochs:
        fit(model, train, val, FitConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, patience=cfg.epochs,
                                         seed=cfg.seed), on_epoch=freeze_when_due, state=state, desc="QAT int8")
    return model


def main() -> None:
    from tasks import tracking
    cfg = load_section("quantize")
    meta, train, val, test = load_data()
    pruned, ckpt = load_model(PRUNED)
    calib_x, calib_hash = calibration_subset(train[0], cfg.calibration_size, cfg.seed)
    example = torch.zeros(input_shape(meta))
    with tracking.stage_run("quantize", cfg.model_dump(), recipe="pqd"):
        extra = {"shapes": ckpt["shapes"], "masks": ckpt["masks"], "input_shape": input_shape(meta),
                 "calibration_sha256": calib_hash, "calibration_x": torch.from_numpy(calib_x)}
        if cfg.method == "qat":
            state_path = resume_file("quantize", cfg.model_dump(), str(ckpt["metrics"]))
            model = quantize_aware_train(pruned, ckpt["masks"], cfg, train, val, calib_x, example,
                                         state=load_resume(state_path, True), on_epoch=epoch_saver(state_path))
            state_path.unlink(missing_ok=True)
        else:
            model = pruned
        metrics = {"method": cfg.method, "val_acc": accuracy(model, *val), "test_acc_torch": accuracy(model, *test),
                   "calibration_size": len(calib_x)}
        save_checkpoint(QUANTIZED, model, ckpt["spec"], qat=cfg.method == "qat", metrics=metrics, **extra)
        write_json("metrics/quantize.json", {**metrics, "calibration_sha256": calib_hash})
        tracking.log_metrics(metrics)
        import mlflow
        mlflow.set_tag("calibration_sha256", calib_hash)
        print(f"quantize: {cfg.method}, val acc {metrics['val_acc']:.4f}, test acc (torch fake-quant) "
              f"{metrics['test_acc_torch']:.4f}; calibration subset sha256 {calib_hash[:12]} -> {QUANTIZED}")


if __name__ == "__main__":
    run_stage(main)
