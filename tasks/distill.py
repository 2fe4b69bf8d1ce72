"""Stage `distill`: knowledge distillation from the FP32 teacher into the pruned, quantized student.

Loss `alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE`; the masks stay fixed and the
fake-quant stays on, so the deployed form does not change after this step. The student keeps
its distilled weights only if they beat its starting point on val (never judged on test).
"""
from __future__ import annotations

import copy

import torch

from tasks.artifacts import load_model, save_checkpoint, write_json
from tasks.compress.kd import distillation_loss
from tasks.compress.pruning import apply_masks
from tasks.config import DistillConfig, load_section
from tasks.errors import run_stage
from tasks.pqd_io import DISTILLED, QUANTIZED, TEACHER, load_data
from tasks.resume import epoch_saver, load_resume, resume_file
from tasks.training import FitConfig, accuracy, fit


def distill(student: torch.nn.Module, teacher: torch.nn.Module, cfg: DistillConfig, train: tuple, val: tuple,
            mask: dict | None = None, state: dict | None = None, on_epoch=None,
            select_on_val: bool = True) -> tuple[torch.nn.Module, dict]:
    """Distil `teacher` into a copy of `student`; returns (the better of before/after on val, record).

    With `select_on_val=False` the distilled weights are kept whatever val says (a fixed-budget
    comparison such as the order ablation, where every order must apply every step).
    """
    start_acc = accuracy(student, *val)
    trained = copy.deepcopy(student)
    hist = fit(trained, train, val, FitConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, patience=cfg.epochs,
                                              seed=cfg.seed),
               loss=distillation_loss(teacher.eval(), cfg.temperature, cfg.alpha),
               after_step=(lambda m: apply_masks(m, mask)) if mask else None,
               on_epoch=on_epoch, state=state, desc="distill")
    improved = hist.best_val_acc > start_acc or not select_on_val
    return (trained if improved else student), {"val_acc_before": start_acc, "val_acc_best": hist.best_val_acc,
                                                "kept_distilled_weights": improved}


def main() -> None:
    from tasks import tracking
    cfg = load_section("distill")
    _, train, val, test = load_data()
    teacher, _ = load_model(TEACHER)
    student, ckpt = load_model(QUANTIZED)
    if ckpt.get("qat"):
        from tasks.compress.qat import freeze_observers
        freeze_observers(student)  # QAT set the activation ranges; distillation must not move the deployed grid
    with tracking.stage_run("distill", cfg.model_dump(), recipe="pqd"):
        mask = None if ckpt.get("qat") else ckpt["masks"]  # QAT layers hold their masks themselves
        state_path = resume_file("distill", cfg.model_dump(), str(ckpt["metrics"]))
        model, record = distill(student, teacher, cfg, train, val, mask, load_resume(state_path, True),
                                epoch_saver(state_path)) if cfg.epochs else (student, {"kept_distilled_weights": False})
        metrics = {**record, "val_acc": accuracy(model, *val), "test_acc_torch": accuracy(model, *test)}
        extra = {k: ckpt[k] for k in ("shapes", "masks", "input_shape", "qat", "calibration_sha256", "calibration_x")}
        save_checkpoint(DISTILLED, model, ckpt["spec"], metrics=metrics, **extra)
        write_json("metrics/distill.json", metrics)
        tracking.log_metrics(metrics)
        state_path.unlink(missing_ok=True)
        print(f"distill: val acc {record.get('val_acc_before', metrics['val_acc']):.4f} -> {metrics['val_acc']:.4f} "
              f"(T={cfg.temperature}, alpha={cfg.alpha}); test acc (torch) {metrics['test_acc_torch']:.4f} -> {DISTILLED}")


if __name__ == "__main__":
    run_stage(main)
