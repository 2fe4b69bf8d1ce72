"""Stage `prepare`: load the raw data, resize, split with a seed, standardise, write the splits.

Writes `data/prepared/{train,val,test}.npz` (x float32 NCHW exactly as the models consume it,
y int64) and `meta.json` (classes, shape, normalisation), which later stages read.
"""
from __future__ import annotations

from distillery.core import tracking
from distillery.core.artifacts import write_json, write_npz
from distillery.core.errors import run_stage
from distillery.core.params import load_section
from distillery.data import load_source, prepare_splits
from tasks.paths import PREPARED


def main() -> None:
    cfg = load_section("prepare")
    with tracking.stage_run("prepare", cfg.model_dump()):
        x, y, classes = load_source(cfg.source, cfg.path)
        splits, meta = prepare_splits(x, y, classes, cfg.image_size, cfg.grayscale, cfg.val_ratio, cfg.test_ratio,
                                      cfg.seed)
        for name, (xs, ys) in splits.items():
            write_npz(PREPARED / f"{name}.npz", x=xs, y=ys)
        write_json(PREPARED / "meta.json", {**meta, "source": cfg.source})
        tracking.log_metrics({f"n_{k}": v for k, v in meta["counts"].items()})
        print(f"prepare: {meta['counts']} images of {meta['in_channels']}x{cfg.image_size}x{cfg.image_size}, "
              f"{meta['num_classes']} classes -> {PREPARED}")


if __name__ == "__main__":
    run_stage(main)
