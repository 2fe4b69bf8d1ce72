"""Stage `train`: the FP32 teacher, with a progress bar, early stopping on val and resume.

Writes `models/teacher.pt`, `metrics/train.json` and the per-epoch curve `plots/train.csv`.
An interrupted run resumes from its last epoch (`train.resume`), from a state file that is
keyed by the config and the data so that a stale one is never picked up.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from tasks.artifacts import atomic_path, save_checkpoint, write_json
from tasks.resume import epoch_saver, load_resume, resume_file
from tasks.config import TrainConfig, load_section
from tasks.data import load_split
from tasks.errors import run_stage
from tasks.models import build_model
from tasks.training import FitConfig, accuracy, fit

PREPARED = Path("data/prepared")
TEACHER = Path("models/teacher.pt")


def model_spec(cfg: TrainConfig, meta: dict) -> dict:
    spec = {"arch": cfg.arch, "width": cfg.width, "depth": cfg.depth,
            "in_channels": meta["in_channels"], "num_classes": meta["num_classes"]}
    if cfg.arch == "vgg16_bn":
        spec["image_size"] = meta["image_size"]
    return spec


def fit_config(cfg: TrainConfig) -> FitConfig:
    return FitConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                     patience=cfg.patience, seed=cfg.seed)


def main() -> None:
    from tasks import tracking
    cfg = load_section("train")
    meta = json.loads((PREPARED / "meta.json").read_text())
    train, val, test = (load_split(PREPARED, s) for s in ("train", "val", "test"))
    spec = model_spec(cfg, meta)
    with tracking.stage_run("train", cfg.model_dump()):
        torch.manual_seed(cfg.seed)
        model = build_model(spec)
        state_path = resume_file("train", cfg.model_dump(), (PREPARED / "meta.json").read_text())
        hist = fit(model, train, val, fit_config(cfg), on_epoch=epoch_saver(state_path),
                   state=load_resume(state_path, cfg.resume), desc="train teacher")
        metrics = {"val_acc": hist.best_val_acc, "best_epoch": hist.best_epoch, "epochs_run": len(hist.epochs),
                   "test_acc_torch": accuracy(model, *test)}
        save_checkpoint(TEACHER, model, spec, metrics=metrics)
        write_json("metrics/train.json", metrics)
        with atomic_path("plots/train.csv") as tmp:
            pd.DataFrame(hist.epochs).to_csv(tmp, index=False)
        tracking.log_metrics({"best_val_acc": metrics["val_acc"], "test_acc_torch": metrics["test_acc_torch"]})
        state_path.unlink(missing_ok=True)
        print(f"train: best val acc {hist.best_val_acc:.4f} at epoch {hist.best_epoch}; "
              f"test acc (torch) {metrics['test_acc_torch']:.4f} -> {TEACHER}")


if __name__ == "__main__":
    run_stage(main)
