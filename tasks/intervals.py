"""Stage `intervals`: PPCL step 2, which contiguous runs of blocks one student each replaces.

From the probes and their calibration inputs: the table cka(u, k) (teacher with blocks u+1..k
replaced by their probes, against the teacher's final hidden output), Delta(u, k), the paper's
disjoint contiguous intervals, every start's candidate interval, and the disjoint selection of
candidates for each `intervals.ratios` share of blocks removed. Beside them the baseline selectors
(block influence, angular distance, CKA threshold); the CKA-threshold selection at the same number
of blocks removed as the `ablation_ratio` variant is the ablation's. Writes
`reports/ppcl_intervals.json` and `reports/ppcl_cka.png` (cka curves per start u, chosen intervals).
"""
from __future__ import annotations

import numpy as np
import torch

from distillery.core.artifacts import write_json
from distillery.core.params import load_section
from distillery.core.errors import run_stage
from distillery.core.plotting import pyplot, save_figure
from distillery.ppcl.capture import ModelInputs
from distillery.ppcl.probes import rebuild_probes
from distillery.ppcl.selection import choose
from distillery.ppcl.source import load_teacher
from distillery.ppcl.students import load_probe_file
from tasks.paths import CKA_PLOT as PLOT, INTERVALS, PPCL_TEACHER as TEACHER, PROBES


def plot(table: np.ndarray, chosen: dict, path) -> None:
    plt = pyplot()
    n = table.shape[0] - 1
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("viridis")
    for u in range(n):
        ks = np.arange(u, n + 1)
        axes[0].plot(ks, table[u, u:], "o-", ms=3, color=cmap(u / max(1, n - 1)), label=f"u={u}")
    axes[0].set_xlabel("k (blocks u+1..k replaced by probes)")
    axes[0].set_ylabel("cka(u, k) with the teacher's output")
    axes[0].legend(fontsize=6, ncol=2)
    axes[0].grid(alpha=0.3)
    rows = list(chosen["selected"].items()) + [("ablation", chosen["ablation"]["intervals"])]
    for y, (name, ivs) in enumerate(rows):
        for u, v in ivs:
            axes[1].barh(y, v - u, left=u, color="tab:orange" if name == "ablation" else "tab:blue", edgecolor="k")
    axes[1].set_yticks(range(len(rows)), [f"{k} ({chosen['removed'].get(k, chosen['ablation']['removed'])} removed)"
                                          if k != "ablation" else f"ablation ({chosen['ablation']['removed']} removed)"
                                          for k, _ in rows])
    axes[1].set_xlim(0, n)
    axes[1].set_xlabel("block")
    axes[1].set_title("chosen intervals (one student each)", fontsize=9)
    save_figure(fig, path, dpi=110)


def main() -> None:
    from distillery.core import tracking
    from distillery.ppcl.adapter import trace
    from distillery.ppcl.hf import adapter_for
    from distillery.ppcl.cka import cka_table
    from distillery.ppcl.hf import resolve_device
    cfg = load_section("intervals")
    device = resolve_device(load_section("ppcl_teacher").device)
    teacher, _ = load_teacher(TEACHER)
    adapter = adapter_for(teacher)
    ckpt = load_probe_file(PROBES)
    probes = [p.to(device) for p in rebuild_probes(ckpt)]
    calibration = ModelInputs(ckpt["calibration"]["batched"], ckpt["calibration"]["static"])
    with tracking.stage_run("intervals", cfg.model_dump()):
        with torch.no_grad():
            tr = trace(teacher.to(device), adapter, calibration.to(device))
            table = cka_table(teacher, adapter, probes, tr)
        chosen = choose(table, tr, adapter, cfg)
        write_json(INTERVALS, chosen)
        plot(table, chosen, PLOT)
        tracking.log_metrics({f"removed.{k}": v for k, v in chosen["removed"].items()}
                             | {"ablation_removed": chosen["ablation"]["removed"]})
        print(f"intervals: contiguous {chosen['intervals']}")
        for k, ivs in chosen["selected"].items():
            print(f"  ratio {k}: {ivs} ({chosen['removed'][k]} blocks removed)")
        print(f"  ablation (CKA >= {cfg.cka_threshold:g}): {chosen['ablation']['intervals']} "
              f"({chosen['ablation']['removed']} removed) -> {INTERVALS}")


if __name__ == "__main__":
    run_stage(main)
