"""Stage `prepare`: load the raw data, fit it to one size, split with a seed, normalise, write the splits.

Writes `data/prepared/{train,val,test}.npz` (x float32 NCHW exactly as the models consume it,
y int64) and `meta.json` (classes, shape, normalisation, where the test split came from), which
later stages read.
"""
from __future__ import annotations

from distillery.core import tracking
from distillery.core.artifacts import write_json, write_npz
from distillery.core.errors import run_stage
from distillery.core.params import load_section
from distillery.data import load_data, prepare_splits
from tasks.paths import PREPARED


def main() -> None:
    cfg = load_section("prepare")
    with tracking.stage_run("prepare", cfg.model_dump()):
        data = load_data(cfg.source, cfg.path, cfg.image_size, cfg.grayscale, cfg.test_path)
        normalize = cfg.normalize if isinstance(cfg.normalize, str) else cfg.normalize.model_dump()
        splits, meta = prepare_splits(data.x, data.y, data.classes, cfg.image_size, cfg.grayscale, cfg.val_ratio,
                                      cfg.test_ratio, cfg.seed, normalize=normalize, test=data.test,
                                      test_source=data.test_source)
        for name, (xs, ys) in splits.items():
            write_npz(PREPARED / f"{name}.npz", x=xs, y=ys)
        write_json(PREPARED / "meta.json", {**meta, "source": cfg.source})
        tracking.log_metrics({f"n_{k}": v for k, v in meta["counts"].items()})
        test_from = {"carved": f"carved from prepare.path (test_ratio {cfg.test_ratio})",
                     "official": "the source's official test files (test_ratio ignored)",
                     "test_path": f"{cfg.test_path} (prepare.test_path; test_ratio ignored)"}[meta["test_source"]]
        print(f"prepare: {meta['counts']} images of {meta['in_channels']}x{cfg.image_size}x{cfg.image_size}, "
              f"{meta['num_classes']} classes, normalize {meta['normalize']}, test split {test_from} -> {PREPARED}")


if __name__ == "__main__":
    run_stage(main)
