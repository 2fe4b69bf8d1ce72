"""Stage `distill`: knowledge distillation from the FP32 teacher into the pruned, quantized student.

Loss `alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE`; the masks stay fixed and the
fake-quant stays on with the activation ranges QAT set, so the deployed form does not change
after this step. The weights of the best val epoch are kept (never judged on test).
"""
from __future__ import annotations

from distillery.compress.checkpoint import load_compressed
from distillery.compress.kd import distill
from distillery.core import tracking
from distillery.core.artifacts import save_checkpoint, write_json
from distillery.core.errors import run_stage
from distillery.core.params import load_section
from distillery.core.resume import epoch_saver, load_resume, resume_file
from distillery.data import load_prepared
from distillery.models import load_model
from distillery.training import FitConfig, accuracy
from tasks.paths import DISTILLED, PREPARED, QUANTIZED, TEACHER, metrics


def main() -> None:
    cfg = load_section("distill")
    _, train, val, test = load_prepared(PREPARED)
    teacher, _ = load_model(TEACHER)
    student, ckpt = load_compressed(QUANTIZED)
    with tracking.stage_run("distill", cfg.model_dump(), recipe="pqd"):
        mask = None if ckpt.get("qat") else ckpt["masks"]  # QAT layers hold their masks themselves
        state_path = resume_file("distill", cfg.model_dump(), str(ckpt["metrics"]))
        record = {}
        if cfg.epochs:
            student, record = distill(student, teacher, train, val,
                                      FitConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                                patience=cfg.epochs, seed=cfg.seed),
                                      cfg.temperature, cfg.alpha, mask, load_resume(state_path, True),
                                      epoch_saver(state_path))
        record = {**record, "val_acc": accuracy(student, *val), "test_acc_torch": accuracy(student, *test)}
        extra = {k: ckpt[k] for k in ("shapes", "masks", "input_shape", "qat", "calibration_sha256", "calibration_x")}
        save_checkpoint(DISTILLED, student, ckpt["spec"], metrics=record, **extra)
        write_json(metrics("distill"), record)
        tracking.log_metrics(record)
        state_path.unlink(missing_ok=True)
        print(f"distill: val acc {record.get('val_acc_before', record['val_acc']):.4f} -> {record['val_acc']:.4f} "
              f"(T={cfg.temperature}, alpha={cfg.alpha}); test acc (torch) {record['test_acc_torch']:.4f} -> {DISTILLED}")


if __name__ == "__main__":
    run_stage(main)
