"""Stage `prune`: magnitude pruning of the teacher (unstructured zeros or whole channels), then a short fine-tune.

Unstructured: global L1 pruning to `prune.sparsity`; the masks travel in the checkpoint so no
later stage can regrow a zero. Structured: Torch-Pruning removes `prune.ratio` of each layer's
channels for real, so dense kernels get faster. Both log params, non-zeros and MACs before and after.
"""
from __future__ import annotations

import copy

import torch

from tasks.artifacts import load_model, save_checkpoint, write_json
from tasks.compress.pruning import apply_masks, masks, prune_structured, prune_unstructured, shapes_of, sparsity
from tasks.config import PruneConfig, load_section
from tasks.errors import run_stage
from tasks.pqd_io import PRUNED, TEACHER, input_shape, load_data, model_stats
from tasks.resume import epoch_saver, load_resume, resume_file
from tasks.training import FitConfig, accuracy, fit


def prune(teacher: torch.nn.Module, cfg: PruneConfig, example: torch.Tensor) -> tuple[torch.nn.Module, dict | None]:
    """The pruned copy of `teacher` and its masks (None for structured: the zeros are gone)."""
    teacher = copy.deepcopy(teacher).requires_grad_(True)  # a teacher used for KD comes frozen; frozen layers are not pruned
    if cfg.method == "unstructured":
        model = prune_unstructured(teacher, cfg.sparsity)
        return model, masks(model)
    return prune_structured(teacher, cfg.ratio, example), None


def main() -> None:
    from tasks import tracking
    cfg = load_section("prune")
    meta, train, val, test = load_data()
    teacher, ckpt = load_model(TEACHER)
    example = torch.zeros(input_shape(meta))
    with tracking.stage_run("prune", cfg.model_dump(), recipe="pqd"):
        before = model_stats(teacher, meta)
        torch.manual_seed(cfg.seed)
        model, mask = prune(teacher, cfg, example)
        pruned_acc = accuracy(model, *val)
        state_path = resume_file("prune", cfg.model_dump(), str(ckpt["metrics"]))
        keep_masks = (lambda m: apply_masks(m, mask)) if mask else None
        if cfg.finetune_epochs:
            fit(model, train, val, FitConfig(epochs=cfg.finetune_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                            patience=cfg.finetune_epochs, seed=cfg.seed),
                after_step=keep_masks, on_epoch=epoch_saver(state_path), state=load_resume(state_path, True),
                desc=f"fine-tune {cfg.method}")
        after = model_stats(model, meta)
        metrics = {"before": before, "after": after, "sparsity": sparsity(model),
                   "val_acc_pruned": pruned_acc, "val_acc": accuracy(model, *val), "test_acc_torch": accuracy(model, *test),
                   "macs_ratio": after["macs"] / before["macs"], "params_ratio": after["params"] / before["params"]}
        save_checkpoint(PRUNED, model, ckpt["spec"], shapes=shapes_of(model) if cfg.method == "structured" else {},
                        masks=mask or {}, input_shape=input_shape(meta), metrics=metrics)
        write_json("metrics/prune.json", metrics)
        tracking.log_metrics(metrics)
        state_path.unlink(missing_ok=True)
        print(f"prune: {cfg.method}, sparsity {metrics['sparsity']:.3f}, params {before['params']} -> {after['params']}, "
              f"non-zero {before['nonzero_params']} -> {after['nonzero_params']}, MACs {before['macs']} -> {after['macs']}; "
              f"val acc {pruned_acc:.4f} after pruning, {metrics['val_acc']:.4f} after fine-tuning -> {PRUNED}")


if __name__ == "__main__":
    run_stage(main)
