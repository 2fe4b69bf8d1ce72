"""Stage `menu`: PPCL's menu of variants from ONE training, assembled by plugging students in.

Every variant is built from the saved students without any training: the teacher, one depth
variant per `intervals.ratios` share (students of the selected intervals plugged into the
teacher), the width-pruned model of `width_prune`, and the ablation row (CKA-threshold intervals,
sequentially distilled students, as many blocks removed as the `intervals.ablation_ratio` variant).
Each is scored on the same seeded prompts and noise (prompt adherence by the foundation digits
classifier, PSNR against the teacher's samples), exported as ONE denoising step to
`models/ppcl/onnx/<variant>.onnx` and timed in this one process against the teacher (ONNX Runtime,
batch 1, at each `menu.threads`, 0 = all cores). Writes `reports/ppcl_menu.md` / `.csv`,
`reports/ppcl_menu.png` (quality against speed-up) and `reports/ppcl/menu/<variant>_samples.png`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import torch

from distillery.core.artifacts import atomic_path, write_json, write_text
from distillery.core.params import load_section
from distillery.core.errors import run_stage
from distillery.core.plotting import pyplot, save_figure
from distillery.models import load_model
from distillery.ppcl.digits import grouped_by_digit, load_classifier, prompts, save_grid
from distillery.ppcl.intervals import variant_name
from distillery.ppcl.students import load_students
from tasks.paths import (INTERVALS, MENU_REPORT as REPORT, PPCL_ONNX as ONNX_DIR, PPCL_REPORTS as REPORTS,
                         PPCL_TEACHER as TEACHER, PREPARED, SEQUENTIAL, STUDENTS, TEACHER as CLASSIFIER, WIDTH, metrics)
METRICS = metrics("ppcl_menu")
BASELINE = "teacher"
GRIDS = REPORTS / "menu"  # reports/ppcl/teacher_samples.png belongs to ppcl_teacher


def assemble_menu(teacher, chosen: dict, width_path: Path | None = WIDTH) -> dict[str, dict]:
    """name -> {"model", "blocks removed", "how"}: every variant, assembled from saved files, no training."""
    from distillery.ppcl.adapter import MMDIT
    from distillery.ppcl.depth import assemble
    n = len(teacher.blocks)
    menu = {BASELINE: {"model": teacher, "how": "teacher"}}
    for name, key in chosen["variants"].items():
        ivs = [tuple(iv) for iv in chosen["selected"][key]]
        menu[name] = {"model": assemble(teacher, MMDIT, load_students(STUDENTS, teacher, MMDIT, ivs)),
                      "how": f"PPCL: Delta intervals {ivs}, independent students"}
    if width_path is not None and width_path.exists():
        model, ckpt = load_model(width_path)
        base = variant_name(ckpt["base_ratio"]) if ckpt["base_ratio"] else BASELINE
        targets = [tuple(t) for t in ckpt["targets"]]
        menu[f"{base}_width"] = {"model": model, "how": f"{base} + linear MLPs (block, stream) {targets}"}
    abl = chosen["ablation"]
    if abl["intervals"] and any(SEQUENTIAL.glob("*.pt")):
        ivs = [tuple(iv) for iv in abl["intervals"]]
        name = f"ablation{round(100 * abl['ratio'])}"
        menu[name] = {"model": assemble(teacher, MMDIT, load_students(SEQUENTIAL, teacher, MMDIT, ivs)),
                      "how": f"ablation: {abl['selector']} intervals {ivs}, sequential students"}
    for v in menu.values():
        v["model"].eval()
        v["blocks"] = len(v["model"].blocks)
        v["removed"] = n - v["blocks"]
    return menu


def export(model, path: Path, opset: int) -> None:
    import onnx
    from distillery.ppcl.export import PackedStep, export_step, pack_inputs
    example = pack_inputs(*model.example_inputs(1))
    proto = export_step(PackedStep(model), (example,), opset=opset, dynamic_batch=False)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


def ort_error(model, path: Path) -> float:
    """Max |ORT - torch| of the exported step on the example input."""
    from distillery.latency import session
    from distillery.ppcl.export import PackedStep, pack_inputs
    packed = pack_inputs(*model.example_inputs(1))
    s = session(path, 1)
    got = s.run(None, {s.get_inputs()[0].name: packed.numpy()})[0]
    with torch.no_grad():
        want = PackedStep(model)(packed).numpy()
    return float(abs(got - want).max())


def table(menu: dict, quality: dict, timing: dict, n_blocks: int) -> pd.DataFrame:
    base = quality[BASELINE]["adherence"]
    rows = []
    for name, v in menu.items():
        q, t = quality[name], timing["models"][name]
        row = {"variant": name, "blocks": v["blocks"], "removed_pct": 100 * v["removed"] / n_blocks,
               "params": sum(p.numel() for p in v["model"].parameters())}
        for key, r in t.items():
            if key.startswith("threads_"):
                label = key.removeprefix("threads_")
                row[f"p50_ms_{label}t"] = r["p50_ms"]
                row[f"speedup_{label}t"] = r["speedup_p50"]
        row["adherence_pct"] = 100 * q["adherence"]
        row["psnr_db"] = None if math.isinf(q["psnr"]) else q["psnr"]
        row["quality_drop_pct"] = 100 * (base - q["adherence"]) / base if base > 0 else float("nan")
        row["how"] = v["how"]
        rows.append(row)
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    speed = next(c for c in df.columns if c.startswith("speedup_"))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for _, r in df.iterrows():
        colour = "tab:red" if r["variant"].startswith("ablation") else "tab:green" if "width" in r["variant"] else "tab:blue"
        ax.scatter(r[speed], r["adherence_pct"], color=colour)
        psnr = "" if r["psnr_db"] is None or pd.isna(r["psnr_db"]) else f", {r['psnr_db']:.1f} dB"
        ax.annotate(f"{r['variant']} ({r['blocks']} blocks{psnr})", (r[speed], r["adherence_pct"]),
                    textcoords="offset points", xytext=(5, -3), fontsize=7)
    ax.set_xlabel(f"speed-up per denoising step vs teacher ({speed.removeprefix('speedup_')}hread(s), ONNX Runtime)")
    ax.set_ylabel("prompt adherence [%]")
    ax.set_title("PPCL menu: one training, variants plugged together", fontsize=9)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    from distillery.core import tracking
    from distillery.latency import benchmark
    from distillery.ppcl.export import pack_inputs
    from distillery.ppcl.quality import adherence, psnr, sample_prompts
    cfg = load_section("menu")
    chosen = json.loads(INTERVALS.read_text())
    teacher, _ = load_model(TEACHER)
    classifier = load_classifier(CLASSIFIER, PREPARED)
    menu = assemble_menu(teacher, chosen)
    labels, tokens, noise = prompts(cfg.prompts_per_digit, cfg.seed, teacher.image_size, teacher.in_channels)
    with tracking.stage_run("menu", cfg.model_dump()):
        quality, reference = {}, None
        for name, v in menu.items():
            images = sample_prompts(v["model"], tokens, noise, cfg.sample_steps, cfg.guidance)
            reference = images if name == BASELINE else reference
            quality[name] = {"adherence": adherence(images, labels, classifier), "psnr": psnr(images, reference)}
            save_grid(grouped_by_digit(images, labels), GRIDS / f"{name}_samples.png")
            print(f"menu: {name:<16} {v['blocks']:2d} blocks, adherence {quality[name]['adherence']:.3f}, "
                  f"PSNR {quality[name]['psnr']:.2f} dB")
        ONNX_DIR.mkdir(parents=True, exist_ok=True)
        for f in ONNX_DIR.glob("*.onnx"):
            if f.stem not in menu:
                f.unlink()
        paths = {}
        for name, v in menu.items():
            paths[name] = ONNX_DIR / f"{name}.onnx"
            export(v["model"], paths[name], cfg.opset)
            quality[name]["ort_max_abs_error"] = ort_error(v["model"], paths[name])
            print(f"menu: exported {name} -> {paths[name]} (ORT vs torch max |diff| {quality[name]['ort_max_abs_error']:.2e})")
        sample = pack_inputs(*teacher.example_inputs(1)).numpy()
        timing = benchmark(paths, BASELINE, sample, cfg.threads, cfg.warmup, cfg.runs)
        df = table(menu, quality, timing, len(teacher.blocks))
        cpu = timing["cpu"]
        caption = (f"One training: students trained once (independently, concurrently), variants assembled without "
                   f"training. Latency = ONE denoising step (batch 1) in ONNX Runtime {cpu['onnxruntime_version']} on "
                   f"{cpu['cpu_model']} ({cpu['cpu_cores']} cores), all variants timed in one process; speed-up = "
                   f"teacher p50 / variant p50. Adherence: share of {len(labels)} fixed prompts ({cfg.sample_steps} Euler "
                   f"steps, guidance {cfg.guidance:g}) that the foundation digits classifier reads as the prompted digit; "
                   f"PSNR against the teacher's samples from the same noise; quality drop = relative adherence drop vs "
                   f"the teacher.")
        write_text(REPORT.with_suffix(".md"), "# PPCL menu\n\n" + df.to_markdown(index=False, floatfmt=".3f")
                   + f"\n\n{caption}\n")
        with atomic_path(REPORT.with_suffix(".csv")) as tmp:
            df.to_csv(tmp, index=False)
        plot(df, REPORT.with_suffix(".png"))
        finite = {n: {k: v for k, v in q.items() if math.isfinite(v)} for n, q in quality.items()}
        write_json(METRICS, {"quality": finite, "timing": timing})
        tracking.log_metrics({"quality": finite, "timing": timing["models"]})
        import mlflow
        for suffix in (".md", ".csv", ".png"):
            mlflow.log_artifact(str(REPORT.with_suffix(suffix)), artifact_path="reports")
        print(df.drop(columns=["how"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    run_stage(main)
