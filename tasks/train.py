"""Stage `train`: the FP32 teacher, with a progress bar, early stopping on val and resume.

Writes `models/teacher.pt`, `metrics/train.json` and the per-epoch curve `plots/train.csv`.
An interrupted run resumes from its last epoch (`train.resume`), from a state file that is
keyed by the config and the data so that a stale one is never picked up.
"""
from __future__ import annotations

import json

import pandas as pd
import torch

from distillery.core import tracking
from distillery.core.artifacts import atomic_path, save_checkpoint, write_json
from distillery.core.errors import run_stage
from distillery.core.params import load_section
from distillery.core.resume import epoch_saver, load_resume, resume_file
from distillery.data import load_prepared
from distillery.models import build_model
from distillery.training import FitConfig, accuracy, fit
from tasks.paths import PREPARED, TEACHER, TRAIN_CURVE, metrics


def main() -> None:
    cfg = load_section("train")
    meta, train, val, test = load_prepared(PREPARED)
    spec = {"arch": cfg.arch, "width": cfg.width, "depth": cfg.depth,
            "in_channels": meta["in_channels"], "num_classes": meta["num_classes"]}
    if cfg.arch == "vgg16_bn":
        spec["image_size"] = meta["image_size"]
    torch.manual_seed(cfg.seed)
    model = build_model(spec)  # an unknown arch fails here, before any training
    with tracking.stage_run("train", cfg.model_dump()):
        state_path = resume_file("train", cfg.model_dump(), json.dumps(meta, sort_keys=True))
        hist = fit(model, train, val, FitConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                                weight_decay=cfg.weight_decay, patience=cfg.patience, seed=cfg.seed),
                   on_epoch=epoch_saver(state_path), state=load_resume(state_path, cfg.resume), desc="train teacher")
        record = {"val_acc": hist.best_val_acc, "best_epoch": hist.best_epoch, "epochs_run": len(hist.epochs),
                  "test_acc_torch": accuracy(model, *test)}
        save_checkpoint(TEACHER, model, spec, metrics=record)
        write_json(metrics("train"), record)
        with atomic_path(TRAIN_CURVE) as tmp:
            pd.DataFrame(hist.epochs).to_csv(tmp, index=False)
        tracking.log_metrics({"best_val_acc": record["val_acc"], "test_acc_torch": record["test_acc_torch"]})
        state_path.unlink(missing_ok=True)
        print(f"train: best val acc {hist.best_val_acc:.4f} at epoch {hist.best_epoch}; "
              f"test acc (torch) {record['test_acc_torch']:.4f} -> {TEACHER}")


if __name__ == "__main__":
    run_stage(main)
