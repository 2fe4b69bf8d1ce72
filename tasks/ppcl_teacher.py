"""Stage `ppcl_teacher`: the model PPCL compresses, and the inputs it is calibrated and trained on.

`ppcl_teacher.model`:
- `digits`: a diffusers `SD3Transformer2DModel` trained here by flow matching on the prepared train + val
  digits (8x8, [-1, 1], one caption each), with a small text encoder beside it; writes the pipeline-like
  folder `models/ppcl/teacher/` (`transformer/`, `text_encoder.*`), a sample grid per prompt
  (`reports/ppcl/teacher/samples.png`) and the prompt adherence that the foundation classifier measures;
- `text`: a transformers `LlamaForCausalLM` trained here on Python's own help texts (byte tokens), saved to
  `models/ppcl/teacher/model/`, with its held-out perplexity;
- a path: the user's `save_pretrained` folder (diffusers or transformers), loaded offline and left in
  place; `ppcl_teacher.inputs` names the captured forward inputs (a capture file or `file.py:function`).

Every kind writes `models/ppcl/teacher/source.json` (what later stages load), `models/ppcl/inputs.pt`:
a seeded calibration subset and held-out inputs, with their md5, in the model's own keyword arguments,
and `reports/ppcl/teacher/inputs.md` (each input's name and shape).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from distillery.core.artifacts import write_json, write_text
from distillery.core.errors import DataError, run_stage
from distillery.core.params import load_section
from distillery.ppcl.capture import ModelInputs, split_call
from distillery.ppcl.source import file_md5s, save_inputs_file, write_source
from tasks.paths import (PPCL_INPUTS as INPUTS, PPCL_REPORTS as REPORTS, PPCL_TEACHER as TEACHER, PREPARED,
                         TEACHER as CLASSIFIER, metrics)

METRICS = metrics("ppcl_teacher")
TEACHER_REPORTS = REPORTS / "teacher"


def describe(name: str, inputs: ModelInputs) -> list[str]:
    """Markdown rows: each input's name, shape and type (per-sample or static)."""
    rows = []
    for kind, values in (("per sample", inputs.batched), ("static", inputs.static)):
        for k, v in values.items():
            shape = f"{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" if isinstance(v, torch.Tensor) else \
                f"{type(v).__name__} of {len(v)}" if isinstance(v, (list, tuple)) else repr(v)[:60]
            rows.append(f"| {name} | {k} | {kind} | {shape} |")
    return rows


def digits_teacher(cfg, device) -> tuple[dict, ModelInputs, ModelInputs, dict]:
    from distillery.core import tracking
    from distillery.ppcl.digits import diffusion_data, grouped_by_digit, load_classifier, prompts, save_grid
    from distillery.ppcl.digits_hf import build_digits_denoiser, save_denoiser
    from distillery.ppcl.flow_matching import FlowConfig, noisy_inputs, train_flow_matching
    from distillery.ppcl.quality import adherence, sample_prompts
    image_size = 8
    x, y = diffusion_data(PREPARED, image_size)
    classifier = load_classifier(CLASSIFIER, PREPARED)
    model = build_digits_denoiser(width=cfg.width, depth=cfg.depth, image_size=image_size, in_channels=1,
                                  seed=cfg.seed).to(device)
    flow = FlowConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, ema_decay=cfg.ema_decay,
                      caption_dropout=cfg.caption_dropout, seed=cfg.seed)
    hist = train_flow_matching(model, x, y, flow, desc="ppcl teacher (SD3, digits)")
    for rec in hist.steps:
        tracking.log_metrics({"loss": rec["loss"]}, step=rec["step"])
    model = model.cpu().eval()
    labels, tokens, noise = prompts(cfg.prompts_per_digit, cfg.seed)
    images = sample_prompts(model, tokens, noise, cfg.sample_steps, cfg.guidance)
    adh = adherence(images, labels, classifier)
    save_denoiser(model, TEACHER)
    save_grid(grouped_by_digit(images, labels), TEACHER_REPORTS / "samples.png")

    def captured(n: int, seed: int) -> ModelInputs:
        x_t, t, tok = noisy_inputs(x, y, n, seed=seed, caption_dropout=cfg.caption_dropout)
        return split_call(model.model_inputs(x_t, t, tok))

    calibration, heldout = captured(cfg.inputs_size, cfg.seed + 1), captured(cfg.heldout_size, cfg.seed + 2)
    metrics = {"final_loss": hist.steps[-1]["loss"] if hist.steps else float("nan"), "seconds": hist.seconds,
               "adherence": adh, "train_images": len(x),
               "params": sum(p.numel() for p in model.transformer.parameters())}
    print(f"ppcl_teacher: SD3Transformer2DModel, {cfg.steps} steps in {hist.seconds:.0f} s, loss "
          f"{metrics['final_loss']:.4f}, adherence {adh:.3f} -> {TEACHER}")
    source = {"kind": "digits", "path": str(TEACHER), "subfolder": "transformer", "class": "SD3Transformer2DModel"}
    return metrics, calibration, heldout, source


def text_teacher(cfg, device) -> tuple[dict, ModelInputs, ModelInputs, dict]:
    from distillery.core import tracking
    from distillery.ppcl.hf import save_variant
    from distillery.ppcl.textlm import (build_llama, chunks, corpus_bytes, heldout_chunks, llama_config, lm_metrics,
                                        split_corpus, train_lm)
    train_ids, held_ids = split_corpus(corpus_bytes())
    config = llama_config(hidden=max(16, round(128 * cfg.width / 4) * 4), layers=cfg.depth, heads=4, seq_len=cfg.seq_len)
    model = build_llama(config, seed=cfg.seed).to(device)
    hist = train_lm(model, train_ids.to(device), steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                    seq_len=cfg.seq_len, seed=cfg.seed)
    for step, loss in zip(hist["step"], hist["loss"]):
        tracking.log_metrics({"loss": loss}, step=step)
    model = model.cpu().eval()
    heldout = split_call({"input_ids": heldout_chunks(held_ids, cfg.seq_len,
                                                      min(cfg.heldout_size, len(held_ids) // cfg.seq_len))})
    calibration = split_call({"input_ids": chunks(train_ids, cfg.seq_len, cfg.inputs_size, cfg.seed + 1)})
    held = lm_metrics(model, heldout.batched["input_ids"])
    shutil.rmtree(TEACHER, ignore_errors=True)  # a digits teacher of an earlier run
    save_variant(model, TEACHER / "model")
    metrics = {"final_loss": hist["loss"][-1] if hist["loss"] else float("nan"),
               "seconds": hist["seconds"][-1] if hist["seconds"] else 0.0,
               "heldout_perplexity": held["perplexity"], "train_bytes": len(train_ids),
               "params": sum(p.numel() for p in model.parameters())}
    print(f"ppcl_teacher: LlamaForCausalLM ({cfg.depth} layers), {cfg.steps} steps in {metrics['seconds']:.0f} s, "
          f"held-out perplexity {held['perplexity']:.3f} -> {TEACHER / 'model'}")
    source = {"kind": "text", "path": str(TEACHER / "model"), "subfolder": None, "class": type(model).__name__}
    return metrics, calibration, heldout, source


def folder_teacher(cfg) -> tuple[dict, ModelInputs, ModelInputs, dict]:
    """The user's model and inputs: checked (the adapter must reproduce the model's own forward on them)
    and split into a seeded calibration subset and held-out inputs."""
    from distillery.ppcl.adapter import trace
    from distillery.ppcl.hf import adapter_for
    from distillery.ppcl.capture import load_inputs
    from distillery.ppcl.hf import forward_output, load_pretrained
    model = load_pretrained(cfg.model, cfg.subfolder)
    adapter = adapter_for(model)
    inputs = load_inputs(cfg.inputs, Path.cwd())
    if len(inputs) < 2:
        raise DataError(f"ppcl_teacher.inputs = {cfg.inputs!r}: {len(inputs)} sample(s); capture at least 2 "
                        "(calibration and held-out), better hundreds")
    shuffled = inputs.subset(len(inputs), cfg.seed)
    n_held = min(cfg.heldout_size, max(1, len(inputs) // 4))
    heldout, calibration = shuffled.take(slice(0, n_held)), shuffled.take(slice(n_held, n_held + cfg.inputs_size))
    probe = heldout.take(slice(0, 2))
    try:
        with torch.no_grad():
            want = forward_output(model, probe.kwargs())
            got = trace(model, adapter, probe).output
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"ppcl_teacher.inputs = {cfg.inputs!r}: {type(model).__name__} does not run on them "
                        f"({type(err).__name__}: {str(err)[:300]}); capture the keyword arguments its forward is "
                        "called with (distillery.ppcl.capture.capture)") from None
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    if err > 1e-4:
        raise DataError(f"{type(model).__name__}: the PPCL adapter does not reproduce the model's forward on these "
                        f"inputs (relative difference {err:.2e}): an input the adapter does not pass to the blocks "
                        "(controlnet, skip_layers, ...), a config it does not know, or a library version other than "
                        "constraints.txt's")
    folder = Path(cfg.model) / (cfg.subfolder or "")
    metrics = {"samples": len(inputs), "calibration": len(calibration), "heldout": len(heldout),
               "params": sum(p.numel() for p in model.parameters()), "blocks": len(adapter.blocks(model))}
    print(f"ppcl_teacher: {type(model).__name__} from {folder} ({metrics['blocks']} blocks, {metrics['params']:,} "
          f"parameters); {len(inputs)} captured inputs: {len(calibration)} calibration, {len(heldout)} held out")
    source = {"kind": "folder", "path": str(cfg.model), "subfolder": cfg.subfolder, "class": type(model).__name__,
              "files": file_md5s(folder)}
    return metrics, calibration, heldout, source


def main() -> None:
    from distillery.core import tracking
    from distillery.ppcl.hf import offline, resolve_device
    cfg = load_section("ppcl_teacher")
    offline()
    device = resolve_device(cfg.device)
    with tracking.stage_run("ppcl_teacher", cfg.model_dump()):
        if cfg.model == "digits":
            metrics, calibration, heldout, source = digits_teacher(cfg, device)
        elif cfg.model == "text":
            metrics, calibration, heldout, source = text_teacher(cfg, device)
        else:
            metrics, calibration, heldout, source = folder_teacher(cfg)
        info = {"source": cfg.inputs or cfg.model, "seed": cfg.seed, "calibration_md5": calibration.digest(),
                "heldout_md5": heldout.digest(), "calibration": len(calibration), "heldout": len(heldout)}
        if source["kind"] == "folder":
            TEACHER.mkdir(parents=True, exist_ok=True)
            for stale in TEACHER.iterdir():  # a model trained here before: not this teacher
                if stale.is_dir():
                    shutil.rmtree(stale)
                elif stale.name != "source.json":
                    stale.unlink()
        save_inputs_file(INPUTS, calibration, heldout, info)
        TEACHER_REPORTS.mkdir(parents=True, exist_ok=True)
        write_text(TEACHER_REPORTS / "inputs.md", f"# Inputs of the PPCL teacher ({source['class']})\n\n"
                   f"From {info['source']}, seed {cfg.seed}; md5 calibration {info['calibration_md5']}, held-out "
                   f"{info['heldout_md5']}.\n\n| set | input | kind | shape |\n|---|---|---|---|\n"
                   + "\n".join(describe("calibration", calibration) + describe("held-out", heldout)) + "\n")
        write_source(TEACHER, source | {"inputs": info})
        write_json(METRICS, metrics | {"inputs": info})
        tracking.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


if __name__ == "__main__":
    run_stage(main)
