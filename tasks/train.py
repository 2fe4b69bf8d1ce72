"""Stage `train`: the FP32 teacher, with a progress bar, early stopping on val and resume.

The teacher is a zoo model or the user's own (`train.model` a factory reference), trained from
scratch, fine-tuned from `train.weights`, or adopted as it is (`train.epochs: 0`): its accuracy is
measured the same way in every case. One batch goes through the model before any training, so a
model whose outputs do not match the data's classes stops here with the two numbers.

Writes `models/teacher.pt`, `metrics/train.json` and the per-epoch curve `plots/train.csv`.
An interrupted run resumes from its last epoch (`train.resume`), from a state file that is
keyed by the config and the data so that a stale one is never picked up.
"""
from __future__ import annotations

import hashlib
import json

import pandas as pd
import torch

from distillery.core import tracking
from distillery.core.artifacts import atomic_path, save_checkpoint, write_json
from distillery.core.errors import run_stage
from distillery.core.params import load_section
from distillery.core.resume import epoch_saver, load_resume, resume_file
from distillery.data import load_prepared
from distillery.models import build_teacher, check_classifier, model_spec
from distillery.models.factory import file_md5, is_factory, source_files
from distillery.training import FitConfig, accuracy, fit
from tasks.paths import PREPARED, TEACHER, TRAIN_CURVE, metrics


def main() -> None:
    cfg = load_section("train")
    meta, train, val, test = load_prepared(PREPARED)
    spec = model_spec(cfg.model, cfg.model_kwargs, meta["in_channels"], meta["num_classes"], meta["image_size"])
    torch.manual_seed(cfg.seed)
    model = build_teacher(spec, cfg.weights)  # an unknown model or weights that do not fit fail here, before training
    check_classifier(model, torch.from_numpy(train[0][:2]), meta["num_classes"], meta["classes"])
    with tracking.stage_run("train", cfg.model_dump()):
        source = model_source(cfg.model, cfg.weights)
        tracking.set_tags({f"source.{k}": v for k, v in source.items()})
        if cfg.epochs == 0:  # adopted as it is: measured, not trained
            record = {"val_acc": accuracy(model, *val), "best_epoch": 0, "epochs_run": 0}
            hist = None
        else:
            data_key = hashlib.sha256(train[0].tobytes() + train[1].tobytes()).hexdigest()
            state_path = resume_file("train", {**cfg.model_dump(), "source": source},
                                     json.dumps(meta, sort_keys=True) + data_key)  # new code, weights or data: no resume
            hist = fit(model, train, val, FitConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                                    weight_decay=cfg.weight_decay, patience=cfg.patience,
                                                    seed=cfg.seed),
                       on_epoch=epoch_saver(state_path), state=load_resume(state_path, cfg.resume), desc="train teacher")
            record = {"val_acc": hist.best_val_acc, "best_epoch": hist.best_epoch, "epochs_run": len(hist.epochs)}
        record |= {"test_acc_torch": accuracy(model, *test), "adopted": cfg.epochs == 0, "source": source}
        save_checkpoint(TEACHER, model, spec, metrics=record)
        write_json(metrics("train"), record)
        curve = pd.DataFrame(hist.epochs) if hist is not None else \
            pd.DataFrame([{"epoch": 0, "train_loss": float("nan"), "val_acc": record["val_acc"]}])
        with atomic_path(TRAIN_CURVE) as tmp:
            curve.to_csv(tmp, index=False)
        tracking.log_metrics({"best_val_acc": record["val_acc"], "test_acc_torch": record["test_acc_torch"]})
        if hist is not None:
            state_path.unlink(missing_ok=True)
        how = "adopted as it is" if cfg.epochs == 0 else f"best val acc {hist.best_val_acc:.4f} at epoch {hist.best_epoch}"
        print(f"train: {cfg.model} {how}; val acc {record['val_acc']:.4f}, test acc (torch) "
              f"{record['test_acc_torch']:.4f} -> {TEACHER}")


def model_source(model: str, weights: str | None) -> dict:
    """Where the teacher's code and weights come from, for the lineage: files with their md5, or a package version."""
    source = {"model": model}
    if is_factory(model):
        files = source_files(model)
        if files:
            source["code"] = ", ".join(f"{f} (md5 {file_md5(f)})" for f in files)
        else:  # an installed package: its version says which code ran
            from importlib.metadata import PackageNotFoundError, version
            package = model.partition(":")[0].split(".")[0]
            try:
                source["code"] = f"{package} {version(package)}"
            except (PackageNotFoundError, ValueError):
                source["code"] = package
    if weights is not None:
        source["weights"] = f"{weights} (md5 {file_md5(weights)})"
    return source

if __name__ == "__main__":
    run_stage(main)
