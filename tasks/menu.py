"""Stage `menu`: PPCL's menu of variants from ONE training, assembled by plugging students in.

Every variant is built from the saved students without any training: the teacher, one depth variant per
`intervals.ratios` share (students of the selected intervals plugged into the teacher), the width-pruned
model of `width_prune`, and the ablation row (CKA-threshold intervals, sequentially distilled students, as
many blocks removed as the `intervals.ablation_ratio` variant). Each variant is written back as a folder
its library loads (`models/ppcl/variants/<variant>/`: `from_pretrained` for depth-only variants,
`distillery.ppcl.hf.load_variant` with linear projectors), reloaded and checked against the in-memory model.

Quality, all on the same inputs: fidelity to the teacher on the held-out inputs (cosine similarity and
relative error of the final output); for a language model also perplexity, its ratio to the teacher's and
next-token agreement on the held-out tokens; for the digits teacher also prompt adherence (the foundation
digits classifier on samples from fixed prompts and noise) and PSNR against the teacher's samples.
Latency: ONE forward (batch 1) exported to `models/ppcl/onnx/<variant>.onnx` and timed in this one ONNX
Runtime process against the teacher at each `menu.threads` (0 = all cores); a class the exporter cannot
export is timed in PyTorch instead (the `runtime` column says which). Writes `reports/ppcl_menu.md` /
`.csv`, `reports/ppcl_menu.png` (quality against speed-up) and, for digits, the sample grids
`reports/ppcl/menu/<variant>_samples.png`.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import torch

from distillery.core.artifacts import atomic_path, write_json, write_text
from distillery.core.params import load_section
from distillery.core.errors import run_stage
from distillery.core.plotting import pyplot, save_figure
from distillery.ppcl.intervals import variant_name
from distillery.ppcl.source import load_inputs_file, load_teacher
from distillery.ppcl.students import load_students
from tasks.paths import (INTERVALS, MENU_REPORT as REPORT, PPCL_INPUTS as INPUTS, PPCL_ONNX as ONNX_DIR,
                         PPCL_REPORTS as REPORTS, PPCL_TEACHER as TEACHER, PREPARED, SEQUENTIAL, STUDENTS,
                         TEACHER as CLASSIFIER, VARIANTS, WIDTH, metrics)
METRICS = metrics("ppcl_menu")
BASELINE = "teacher"
GRIDS = REPORTS / "menu"  # reports/ppcl/teacher_samples.png belongs to ppcl_teacher


def assemble_menu(teacher, adapter, chosen: dict, width_path: Path | None = WIDTH) -> dict[str, dict]:
    """name -> {"model", "blocks", "removed", "how"}: every variant, assembled from saved files, no training."""
    from distillery.ppcl.depth import assemble
    from distillery.ppcl.hf import load_pretrained
    n = len(adapter.blocks(teacher))
    menu = {BASELINE: {"model": teacher, "how": "teacher"}}
    for name, key in chosen["variants"].items():
        ivs = [tuple(iv) for iv in chosen["selected"][key]]
        menu[name] = {"model": assemble(teacher, adapter, load_students(STUDENTS, teacher, adapter, ivs)),
                      "how": f"PPCL: Delta intervals {ivs}, independent students"}
    if width_path is not None and (Path(width_path) / "config.json").exists():
        model = load_pretrained(width_path)
        info = json.loads((Path(width_path) / "distillery_ppcl.json").read_text())
        base = variant_name(info["base_ratio"]) if info["base_ratio"] else BASELINE
        targets = [tuple(t) for t in info["targets"]]
        menu[f"{base}_width"] = {"model": model, "how": f"{base} + linear MLPs (block, stream) {targets}"}
    abl = chosen["ablation"]
    if abl["intervals"] and any(SEQUENTIAL.glob("*.pt")):
        ivs = [tuple(iv) for iv in abl["intervals"]]
        name = f"ablation{round(100 * abl['ratio'])}"
        menu[name] = {"model": assemble(teacher, adapter, load_students(SEQUENTIAL, teacher, adapter, ivs)),
                      "how": f"ablation: {abl['selector']} intervals {ivs}, sequential students"}
    for v in menu.values():
        v["model"].eval()
        v["blocks"] = len(adapter.blocks(v["model"]))
        v["removed"] = n - v["blocks"]
    return menu


def save_variants(menu: dict, heldout) -> dict[str, float]:
    """Each variant but the teacher as a folder its library loads; reloaded, the largest |difference| of its
    output from the in-memory variant's on a few held-out inputs."""
    from distillery.ppcl.hf import load_pretrained, outputs, save_variant
    VARIANTS.mkdir(parents=True, exist_ok=True)
    for old in VARIANTS.iterdir():
        if old.name not in menu:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    probe, errors = heldout.take(slice(0, 4)), {}
    for name, v in menu.items():
        if name == BASELINE:
            continue
        folder = save_variant(v["model"], VARIANTS / name, {"how": v["how"], "blocks": v["blocks"]})
        errors[name] = float((outputs(load_pretrained(folder), probe) - outputs(v["model"], probe)).abs().max())
        print(f"menu: {name} -> {folder} (reloaded: max |diff| {errors[name]:.2e})")
    return errors


def fidelity(menu: dict, adapter, heldout, batch_size: int = 16) -> dict[str, dict]:
    """Every variant against the teacher on the held-out inputs, batch by batch (no variant's outputs are
    kept whole: an LLM's logits over a large vocabulary would not fit): cosine and relative error of the
    output; for a language model also perplexity, its ratio and next-token agreement (padding excluded)."""
    from distillery.ppcl.fidelity import FidelityMeter
    from distillery.ppcl.hf import forward_output
    lm = adapter.streams == ("h",) and "input_ids" in heldout.batched
    meters = {name: FidelityMeter(lm) for name in menu}
    with torch.no_grad():
        for i in range(0, len(heldout), batch_size):
            part = heldout.take(slice(i, i + batch_size))
            kwargs = part.kwargs()
            ref = forward_output(menu[BASELINE]["model"], kwargs).float()
            for name, v in menu.items():
                out = ref if name == BASELINE else forward_output(v["model"], kwargs).float()
                meters[name].update(ref, out, kwargs.get("input_ids"), kwargs.get("attention_mask"))
    return {name: m.result() for name, m in meters.items()}


def digits_quality(menu: dict, cfg) -> dict[str, dict]:
    """Prompt adherence and PSNR of every variant's samples (digits teacher only), and their grids."""
    from distillery.ppcl.digits import grouped_by_digit, load_classifier, prompts, save_grid
    from distillery.ppcl.digits_hf import load_denoiser
    from distillery.ppcl.quality import adherence, psnr, sample_prompts
    classifier = load_classifier(CLASSIFIER, PREPARED)
    labels, tokens, noise = prompts(cfg.prompts_per_digit, cfg.seed)
    out, reference = {}, None
    for name, v in menu.items():
        images = sample_prompts(load_denoiser(TEACHER, transformer=v["model"]), tokens, noise, cfg.sample_steps,
                                cfg.guidance)
        reference = images if name == BASELINE else reference
        out[name] = {"adherence": adherence(images, labels, classifier), "psnr": psnr(images, reference)}
        save_grid(grouped_by_digit(images, labels), GRIDS / f"{name}_samples.png")
        print(f"menu: {name:<16} {v['blocks']:2d} blocks, adherence {out[name]['adherence']:.3f}, "
              f"PSNR {out[name]['psnr']:.2f} dB")
    out["_prompts"] = len(labels)
    return out


def timing(menu: dict, example, cfg) -> tuple[dict, str, str | None]:
    """Latency of one forward of every variant at batch 1: ONNX Runtime when every variant exports, else
    PyTorch for all (so that the ratios compare like with like)."""
    import onnx
    import onnxruntime  # noqa: F401  (fails early when missing)
    from distillery.latency import benchmark_runners, session
    from distillery.ppcl.export import export_forward, split_example
    kwargs = example.kwargs()
    names, tensors, _ = split_example(kwargs)
    ONNX_DIR.mkdir(parents=True, exist_ok=True)
    for f in ONNX_DIR.glob("*.onnx"):
        if f.stem not in menu:
            f.unlink()
    paths, failure = {}, None
    for name, v in menu.items():
        try:
            proto = export_forward(v["model"], kwargs, opset=cfg.opset)
        except Exception as err:
            first = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()[0][:200] if str(err).strip() else ""
            failure = f"{type(err).__name__}: {first}"
            print(f"menu: ONNX export of {type(v['model']).__name__} failed ({failure}); timing in PyTorch")
            break
        paths[name] = ONNX_DIR / f"{name}.onnx"
        with atomic_path(paths[name]) as tmp:
            onnx.save(proto, str(tmp))
    if failure is None:
        feeds = {n: t.numpy() for n, t in zip(names, tensors)}

        def make(threads):
            sessions = {name: session(p, threads) for name, p in paths.items()}
            return {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}
        runtime = "onnxruntime"
    else:
        for f in ONNX_DIR.glob("*.onnx"):
            f.unlink()
        from distillery.ppcl.hf import forward_output

        def make(threads):
            torch.set_num_threads(threads or os.cpu_count() or 1)

            @torch.inference_mode()
            def run(model):
                return forward_output(model, kwargs)
            return {name: (lambda m=v["model"]: run(m)) for name, v in menu.items()}
        runtime = "pytorch"
    threads_before = torch.get_num_threads()
    try:
        res = benchmark_runners(make, BASELINE, cfg.threads, cfg.warmup, cfg.runs)
    finally:
        torch.set_num_threads(threads_before)
    return res, runtime, failure


def table(menu: dict, quality: dict, timing: dict, n_blocks: int, runtime: str) -> pd.DataFrame:
    rows = []
    base = quality[BASELINE]
    for name, v in menu.items():
        q, t = quality[name], timing["models"][name]
        row = {"variant": name, "blocks": v["blocks"], "removed_pct": 100 * v["removed"] / n_blocks,
               "params": sum(p.numel() for p in v["model"].parameters())}
        for key, r in t.items():
            label = key.removeprefix("threads_")
            row[f"p50_ms_{label}t"] = r["p50_ms"]
            row[f"speedup_{label}t"] = r["speedup_p50"]
        if "adherence" in q:
            row["adherence_pct"] = 100 * q["adherence"]
            row["psnr_db"] = None if math.isinf(q["psnr"]) else q["psnr"]
            row["quality_drop_pct"] = (100 * (base["adherence"] - q["adherence"]) / base["adherence"]
                                       if base["adherence"] > 0 else float("nan"))
        if "perplexity_variant" in q:
            row["perplexity"] = q["perplexity_variant"]
            row["perplexity_ratio"] = q["perplexity_ratio"]
            row["next_token_agreement_pct"] = 100 * q["next_token_agreement"]
        row["cosine"] = q["cosine"]
        row["relative_error"] = q["relative_error"]
        row["runtime"] = runtime
        row["how"] = v["how"]
        rows.append(row)
    return pd.DataFrame(rows)


QUALITY = (("adherence_pct", "prompt adherence [%]"), ("perplexity", "held-out perplexity (lower is better)"),
           ("cosine", "cosine similarity of the output to the teacher's"))


def plot(df: pd.DataFrame, path: Path, runtime: str) -> None:
    plt = pyplot()
    speed = next(c for c in df.columns if c.startswith("speedup_"))
    col, label = next((c, lab) for c, lab in QUALITY if c in df.columns)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for _, r in df.iterrows():
        colour = "tab:red" if r["variant"].startswith("ablation") else "tab:green" if "width" in r["variant"] else "tab:blue"
        ax.scatter(r[speed], r[col], color=colour)
        psnr = r.get("psnr_db")
        extra = "" if psnr is None or pd.isna(psnr) else f", {psnr:.1f} dB"
        ax.annotate(f"{r['variant']} ({r['blocks']} blocks{extra})", (r[speed], r[col]),
                    textcoords="offset points", xytext=(5, -3), fontsize=7)
    ax.set_xlabel(f"speed-up per forward vs teacher ({speed.removeprefix('speedup_')}hread(s), {runtime})")
    ax.set_ylabel(label)
    ax.set_title("PPCL menu: one training, variants plugged together", fontsize=9)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    from distillery.core import tracking
    from distillery.ppcl.hf import adapter_for
    from distillery.ppcl.hf import offline
    cfg = load_section("menu")
    offline()
    chosen = json.loads(INTERVALS.read_text())
    teacher, source = load_teacher(TEACHER)
    adapter = adapter_for(teacher)
    _, heldout, _ = load_inputs_file(INPUTS)
    menu = assemble_menu(teacher, adapter, chosen)
    n_blocks = len(adapter.blocks(teacher))
    with tracking.stage_run("menu", cfg.model_dump()):
        reload_errors = save_variants(menu, heldout)
        quality = fidelity(menu, adapter, heldout)
        for name, err in reload_errors.items():
            quality[name]["reload_max_abs_error"] = err
        prompts_n = None
        GRIDS.mkdir(parents=True, exist_ok=True)
        for stale in GRIDS.iterdir():
            stale.unlink()
        write_text(GRIDS / "index.md", "# Sample grids of the menu's variants\n\n" + (
            "\n".join(f"- {name}: ![{name}]({name}_samples.png)" for name in menu) if source["kind"] == "digits" else
            f"None: the teacher ({source['class']}) is not the digits text-to-image model.") + "\n")
        if source["kind"] == "digits":
            digits = digits_quality(menu, cfg)
            prompts_n = digits.pop("_prompts")
            for name, q in digits.items():
                quality[name] |= q
        res, runtime, failure = timing(menu, heldout.take(slice(0, 1)), cfg)
        df = table(menu, quality, res, n_blocks, runtime)
        cpu = res["cpu"]
        caption = (f"One training: students trained once (independently, concurrently), variants assembled without "
                   f"training. Teacher: {source['class']} ({source['kind']}: {source['path']}). Latency = ONE forward "
                   f"(batch 1) in {runtime}" + (f" (the ONNX export failed: {failure})" if failure else
                                               f" {cpu['onnxruntime_version']}") +
                   f" on {cpu['cpu_model']} ({cpu['cpu_cores']} cores), all variants timed in one process; speed-up = "
                   f"teacher p50 / variant p50. Fidelity on {len(heldout)} held-out inputs: cosine similarity (mean "
                   f"over samples) and relative error of the final output against the teacher's.")
        if prompts_n:
            caption += (f" Adherence: share of {prompts_n} fixed prompts ({cfg.sample_steps} Euler steps, guidance "
                        f"{cfg.guidance:g}) that the foundation digits classifier reads as the prompted digit; PSNR "
                        f"against the teacher's samples from the same noise; quality drop = relative adherence drop.")
        if "perplexity" in df.columns:
            caption += (" Perplexity on the held-out tokens; next-token agreement = share of positions where the "
                        "variant's most likely next token is the teacher's.")
        write_text(REPORT.with_suffix(".md"), "# PPCL menu\n\n" + df.to_markdown(index=False, floatfmt=".3f")
                   + f"\n\n{caption}\n")
        with atomic_path(REPORT.with_suffix(".csv")) as tmp:
            df.to_csv(tmp, index=False)
        plot(df, REPORT.with_suffix(".png"), runtime)
        finite = {n: {k: v for k, v in q.items() if isinstance(v, (int, float)) and math.isfinite(v)}
                  for n, q in quality.items()}
        write_json(METRICS, {"quality": finite, "timing": res, "runtime": runtime, "export_failure": failure})
        tracking.log_metrics({"quality": finite, "timing": res["models"]})
        import mlflow
        for suffix in (".md", ".csv", ".png"):
            mlflow.log_artifact(str(REPORT.with_suffix(suffix)), artifact_path="reports")
        print(df.drop(columns=["how"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    run_stage(main)
