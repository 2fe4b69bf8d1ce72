"""Stage `prune`: magnitude pruning of the teacher (unstructured zeros or whole channels), then a short fine-tune.

Unstructured: global L1 pruning to `prune.sparsity`; the masks travel in the checkpoint so no
later stage can regrow a zero. Structured: Torch-Pruning removes `prune.ratio` of each layer's
channels for real, so dense kernels get faster. Both log params, non-zeros and MACs before and after.
"""
from __future__ import annotations

import torch

from distillery.compress.pruning import finetune_pruned, model_stats, prune, shapes_of, sparsity
from distillery.core import tracking
from distillery.core.artifacts import save_checkpoint, write_json
from distillery.core.errors import run_stage
from distillery.core.params import load_section
from distillery.core.resume import epoch_saver, load_resume, resume_file
from distillery.data import input_shape, load_prepared
from distillery.models import load_model
from distillery.training import FitConfig, accuracy
from tasks.paths import PREPARED, PRUNED, TEACHER, metrics


def main() -> None:
    cfg = load_section("prune")
    meta, train, val, test = load_prepared(PREPARED)
    teacher, ckpt = load_model(TEACHER)
    example = torch.zeros(input_shape(meta))
    with tracking.stage_run("prune", cfg.model_dump(), recipe="pqd"):
        before = model_stats(teacher, example)
        torch.manual_seed(cfg.seed)
        model, mask = prune(teacher, cfg.method, cfg.sparsity if cfg.method == "unstructured" else cfg.ratio, example,
                            cfg.round_to or None)
        pruned_acc = accuracy(model, *val)
        state_path = resume_file("prune", cfg.model_dump(), str(ckpt["metrics"]))
        if cfg.finetune_epochs:
            finetune_pruned(model, mask, train, val,
                            FitConfig(epochs=cfg.finetune_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                      patience=cfg.finetune_epochs, seed=cfg.seed),
                            state=load_resume(state_path, True), on_epoch=epoch_saver(state_path),
                            desc=f"fine-tune {cfg.method}")
        after = model_stats(model, example)
        record = {"before": before, "after": after, "sparsity": sparsity(model),
                  "val_acc_pruned": pruned_acc, "val_acc": accuracy(model, *val), "test_acc_torch": accuracy(model, *test),
                  "macs_ratio": after["macs"] / before["macs"], "params_ratio": after["params"] / before["params"]}
        save_checkpoint(PRUNED, model, ckpt["spec"], shapes=shapes_of(model) if cfg.method == "structured" else {},
                        masks=mask or {}, input_shape=input_shape(meta), metrics=record)
        write_json(metrics("prune"), record)
        tracking.log_metrics(record)
        state_path.unlink(missing_ok=True)
        print(f"prune: {cfg.method}, sparsity {record['sparsity']:.3f}, params {before['params']} -> {after['params']}, "
              f"non-zero {before['nonzero_params']} -> {after['nonzero_params']}, MACs {before['macs']} -> {after['macs']}; "
              f"val acc {pruned_acc:.4f} after pruning, {record['val_acc']:.4f} after fine-tuning -> {PRUNED}")


if __name__ == "__main__":
    run_stage(main)
