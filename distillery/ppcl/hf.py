"""PPCL adapters for the block stacks of diffusers and transformers models, and their files.

Written against the versions pinned in constraints.txt (diffusers 0.42, transformers 5.24): each
adapter repeats its class's `forward` up to the block loop (`embed`), calls one block as the loop does
(`call_block`) and finishes as `forward` does (`head`); `tests/distillery/ppcl/test_ppcl_hf.py` checks
that embed -> blocks -> head reproduces `model(**inputs)` for every class, so a release that changes a
block signature fails there first.

- diffusers `SD3Transformer2DModel`: `transformer_blocks`; the last block (`context_pre_only`, no text
  stream out) belongs to the head and is never pruned.
- diffusers `FluxTransformer2DModel`: the double-stream `transformer_blocks` then the
  `single_transformer_blocks`, one stack of (img, txt) blocks (the single blocks split their joint
  sequence back into the two streams); a student replacing an interval lands in the stack of its type.
- diffusers `QwenImageTransformer2DModel`: `transformer_blocks`.
- transformers decoders with `model.model.layers` (Llama, Qwen2, Qwen3, Mistral, ...): one stream, the
  token hidden state; rotary embeddings and causal masks come from the model.

`load_pretrained` reads a `save_pretrained` folder offline; `save_variant` writes a pruned model back as
a folder: a depth-only variant is the stock class with fewer layers (plain `from_pretrained` loads it),
a width-pruned one also lists its linear projectors in `distillery_ppcl.json` and loads with
`load_variant`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from distillery.core.errors import DataError, ParamsError
from distillery.models.factory import import_module
from distillery.ppcl.adapter import Adapter, Cond, States, adapter_for as zoo_adapter_for

# transformers and diffusers import torchvision when it is installed; next to the CPU torch its wheel needs
# the detection ops declared first (see distillery.models.factory)
import_module("torchvision")

VARIANT_FILE = "distillery_ppcl.json"


def offline() -> None:
    """Never reach the Hub: everything is read from local folders."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _kw(inputs) -> dict:
    return inputs.kwargs() if hasattr(inputs, "kwargs") else dict(inputs)


def _dual(out) -> States:
    enc, hs = out
    return (hs, enc)


# --- SD3 ------------------------------------------------------------------------------------------------

def _sd3_split(model) -> tuple[list, list]:
    blocks = list(model.transformer_blocks)
    if blocks and blocks[-1].context_pre_only:
        return blocks[:-1], blocks[-1:]
    return blocks, []


def _sd3_get(model):
    return _sd3_split(model)[0]


def _sd3_set(model, blocks):
    model.transformer_blocks = nn.ModuleList(list(blocks) + _sd3_split(model)[1])


def _sd3_embed(model, inputs):
    kw = _kw(inputs)
    x = kw["hidden_states"]
    hs = model.pos_embed(x).contiguous()
    temb = model.time_text_embed(kw["timestep"], kw["pooled_projections"])
    enc = model.context_embedder(kw["encoder_hidden_states"])
    return (hs, enc), Cond({"temb": temb}, {"hw": tuple(x.shape[-2:])})


def _sd3_call(block, states, cond):
    return _dual(block(hidden_states=states[0], encoder_hidden_states=states[1], temb=cond.get("temb")))


def _sd3_head(model, states, cond):
    hs, enc = states
    temb = cond.get("temb")
    for block in _sd3_split(model)[1]:
        enc, hs = block(hidden_states=hs, encoder_hidden_states=enc, temb=temb)
    hs = model.proj_out(model.norm_out(hs, temb))
    p = model.config.patch_size
    h, w = cond.get("hw")
    hs = hs.reshape(hs.shape[0], h // p, w // p, p, p, model.out_channels)
    return torch.einsum("nhwpqc->nchpwq", hs).reshape(hs.shape[0], model.out_channels, h, w)


def _sd3_config(model, blocks) -> dict:
    all_blocks = list(model.transformer_blocks)
    return {"num_layers": len(all_blocks),
            "dual_attention_layers": tuple(i for i, b in enumerate(all_blocks) if getattr(b, "use_dual_attention", False))}


# --- Flux -----------------------------------------------------------------------------------------------

def _flux_get(model):
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


def _flux_set(model, blocks):
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
    single = [isinstance(b, FluxSingleTransformerBlock) for b in blocks]
    if any(s and not t for s, t in zip(single, single[1:])):
        raise ValueError("Flux: a double-stream block after a single-stream one")
    model.transformer_blocks = nn.ModuleList([b for b, s in zip(blocks, single) if not s])
    model.single_transformer_blocks = nn.ModuleList([b for b, s in zip(blocks, single) if s])


def _flux_embed(model, inputs):
    kw = _kw(inputs)
    hs = model.x_embedder(kw["hidden_states"])
    timestep = kw["timestep"].to(hs.dtype) * 1000
    guidance = kw.get("guidance")
    pooled = kw.get("pooled_projections")
    if guidance is not None:
        temb = model.time_text_embed(timestep, guidance.to(hs.dtype) * 1000, pooled)
    else:
        temb = model.time_text_embed(timestep, pooled)
    enc = model.context_embedder(kw["encoder_hidden_states"])
    txt_ids, img_ids = kw["txt_ids"], kw["img_ids"]
    txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
    img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    rotary = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    return (hs, enc), Cond({"temb": temb}, {"rotary": rotary})


def _flux_call(block, states, cond):
    return _dual(block(hidden_states=states[0], encoder_hidden_states=states[1], temb=cond.get("temb"),
                       image_rotary_emb=cond.get("rotary")))


def _flux_head(model, states, cond):
    return model.proj_out(model.norm_out(states[0], cond.get("temb")))


def _flux_config(model, blocks) -> dict:
    return {"num_layers": len(model.transformer_blocks), "num_single_layers": len(model.single_transformer_blocks)}


# --- Qwen-Image -----------------------------------------------------------------------------------------

def _qwen_embed(model, inputs):
    from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask
    if model.zero_cond_t:
        raise ParamsError("Qwen-Image with zero_cond_t (the edit models) is not supported by PPCL yet")
    kw = _kw(inputs)
    shapes = kw.get("img_shapes")
    if shapes is not None and len({repr(s) for s in shapes}) > 1:
        raise DataError("Qwen-Image inputs with different img_shapes in one set: capture one resolution per file")
    hs = model.img_in(kw["hidden_states"])
    timestep = kw["timestep"].to(hs.dtype)
    enc = model.txt_in(model.txt_norm(kw["encoder_hidden_states"]))
    text_len, _, mask = compute_text_seq_len_from_mask(enc, kw.get("encoder_hidden_states_mask"))
    guidance = kw.get("guidance")
    extra = kw.get("additional_t_cond")
    temb = (model.time_text_embed(timestep, hs, extra) if guidance is None
            else model.time_text_embed(timestep, guidance.to(hs.dtype) * 1000, hs, extra))
    rotary = model.pos_embed(shapes, max_txt_seq_len=text_len, device=hs.device)
    batched = {"temb": temb} | ({} if mask is None else {"mask": mask})
    return (hs, enc), Cond(batched, {"rotary": rotary})


def _qwen_call(block, states, cond):
    return _dual(block(hidden_states=states[0], encoder_hidden_states=states[1],
                       encoder_hidden_states_mask=cond.get("mask"), temb=cond.get("temb"),
                       image_rotary_emb=cond.get("rotary")))


def _qwen_head(model, states, cond):
    return model.proj_out(model.norm_out(states[0], cond.get("temb")))


def _qwen_config(model, blocks) -> dict:
    return {"num_layers": len(model.transformer_blocks)}


# --- transformers decoders ------------------------------------------------------------------------------

def _lm_get(model):
    return list(model.model.layers)


def _lm_set(model, blocks):
    model.model.layers = nn.ModuleList(blocks)


def _layer_type(block) -> str:
    return getattr(block, "attention_type", None) or getattr(getattr(block, "self_attn", None), "layer_type", None) \
        or "full_attention"


def _lm_embed(model, inputs):
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    kw = _kw(inputs)
    base = model.model
    emb = base.embed_tokens(kw["input_ids"]) if "inputs_embeds" not in kw else kw["inputs_embeds"]
    per_sample = "position_ids" in kw  # captured positions are per sample; the default arange is shared
    pos = kw["position_ids"].expand(emb.shape[0], -1) if per_sample else \
        torch.arange(emb.shape[1], device=emb.device)[None]
    padding = kw.get("attention_mask")
    # with a padding mask every chunk gets a real (batch, 1, T, T) mask (sdpa would skip an all-ones chunk's,
    # and chunks must agree); without one the mask is None everywhere and attention is causal
    mask_kw = {"config": base.config, "inputs_embeds": emb, "attention_mask": padding, "cache": None,
               "position_ids": pos, "allow_is_causal_skip": padding is None}
    masks = {"full_attention": create_causal_mask(**mask_kw)}
    if "sliding_attention" in (getattr(base.config, "layer_types", None) or ()):
        masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kw)
    rotary = base.rotary_emb(emb, position_ids=pos)
    batched, shared = {}, {}
    for k, m in masks.items():
        (batched if padding is not None else shared)[f"mask.{k}"] = m
    (batched if per_sample else shared).update({"pos": pos, "cos": rotary[0], "sin": rotary[1]})
    return (emb,), Cond(batched, shared)


def _lm_call(block, states, cond):
    out = block(states[0], attention_mask=cond.get(f"mask.{_layer_type(block)}"), position_ids=cond.get("pos"),
                position_embeddings=(cond.get("cos"), cond.get("sin")))
    return (out[0] if isinstance(out, tuple) else out,)


def _lm_head(model, states, cond):
    return model.lm_head(model.model.norm(states[0]))


def _lm_config(model, blocks) -> dict:
    return {"num_hidden_layers": len(blocks)}


# --- the adapters ---------------------------------------------------------------------------------------

SD3 = Adapter(streams=("img", "txt"), embed=_sd3_embed, head=_sd3_head, get_blocks=_sd3_get, set_blocks=_sd3_set,
              call_block=_sd3_call, mlp_attrs=("ff", "ff_context"), name="SD3Transformer2DModel")
FLUX = Adapter(streams=("img", "txt"), embed=_flux_embed, head=_flux_head, get_blocks=_flux_get, set_blocks=_flux_set,
               call_block=_flux_call, mlp_attrs=("ff", "ff_context"), name="FluxTransformer2DModel")
QWEN_IMAGE = Adapter(streams=("img", "txt"), embed=_qwen_embed, head=_qwen_head, blocks_attr="transformer_blocks",
                     call_block=_qwen_call, mlp_attrs=("img_mlp", "txt_mlp"), name="QwenImageTransformer2DModel")
DECODER = Adapter(streams=("h",), embed=_lm_embed, head=_lm_head, get_blocks=_lm_get, set_blocks=_lm_set,
                  call_block=_lm_call, mlp_attrs=("mlp",), name="decoder LLM (model.model.layers)")

CONFIG_KEYS = {"SD3Transformer2DModel": _sd3_config, "FluxTransformer2DModel": _flux_config,
               "QwenImageTransformer2DModel": _qwen_config}
SUPPORTED = "diffusers SD3Transformer2DModel, FluxTransformer2DModel, QwenImageTransformer2DModel; " \
            "transformers LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM (no sliding window)"


DECODER_TYPES = ("llama", "qwen2", "qwen3", "mistral")  # forward = embed, layers, norm, lm_head: nothing else


def is_decoder(model: nn.Module) -> bool:
    inner = getattr(model, "model", None)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in DECODER_TYPES:
        return False  # Gemma scales embeddings, Cohere / Granite scale logits, ...: a forward this adapter misses
    if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        return False  # every layer uses the sliding-window mask, without layer_types
    return (hasattr(model, "lm_head") and inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList)
            and hasattr(inner, "rotary_emb") and hasattr(inner, "embed_tokens"))


def hf_adapter(model: nn.Module) -> Adapter:
    name = type(model).__name__
    for adapter in (SD3, FLUX, QWEN_IMAGE):
        if name == adapter.name:
            return adapter
    if is_decoder(model):
        return DECODER
    raise ParamsError(f"PPCL has no adapter for {type(model).__module__}.{name}; supported: {SUPPORTED}")


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of any model PPCL supports: the project's zoo, diffusers and transformers classes."""
    if type(model).__module__.startswith(("diffusers.", "transformers.")):
        return hf_adapter(model)
    return zoo_adapter_for(model)


def config_update(model: nn.Module, adapter: Adapter) -> dict:
    """The config keys that describe the model's current (pruned) stack."""
    if adapter is DECODER:
        return _lm_config(model, adapter.blocks(model))
    return CONFIG_KEYS[adapter.name](model, adapter.blocks(model))


# --- files ----------------------------------------------------------------------------------------------

def library_of(folder: Path) -> str:
    """'diffusers' or 'transformers', from the folder's config.json."""
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise DataError(f"{folder}: no config.json; point ppcl_teacher.model at a save_pretrained folder "
                        "(with ppcl_teacher.subfolder for a pipeline's transformer, e.g. subfolder: transformer)")
    cfg = json.loads(cfg_path.read_text())
    if "_class_name" in cfg or "_diffusers_version" in cfg:
        return "diffusers"
    if "model_type" in cfg or "architectures" in cfg:
        return "transformers"
    raise DataError(f"{cfg_path}: neither a diffusers nor a transformers config (no _class_name / model_type)")


def load_pretrained(path: Path | str, subfolder: str | None = None) -> nn.Module:
    """The model in a local `save_pretrained` folder, offline, float32, eval mode; a width-pruned variant
    (with `distillery_ppcl.json`) is rebuilt with its projectors."""
    offline()
    folder = Path(path) / (subfolder or "")
    if not folder.is_dir():
        raise DataError(f"{folder}: model folder not found" + ("" if subfolder else
                        "; for a pipeline folder set ppcl_teacher.subfolder (e.g. transformer)"))
    if (folder / VARIANT_FILE).exists() and json.loads((folder / VARIANT_FILE).read_text()).get("linear_mlps"):
        return load_variant(folder)
    lib = library_of(folder)
    try:
        if lib == "diffusers":
            import diffusers
            name = json.loads((folder / "config.json").read_text()).get("_class_name", "")
            cls = getattr(diffusers, name, None)
            if cls is None:
                raise ParamsError(f"{folder}: diffusers has no class {name!r}; supported: {SUPPORTED}")
            model = cls.from_pretrained(folder, torch_dtype=torch.float32, low_cpu_mem_usage=False)
        else:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (ParamsError, DataError):
        raise
    except Exception as err:
        raise DataError(f"{folder}: {lib} could not load it: {type(err).__name__}: {str(err)[:300]}") from None
    hf_adapter(model)  # unsupported classes stop here, before any work
    return model.eval()


def _renumber(model: nn.Module, adapter: Adapter) -> None:
    if adapter is DECODER:
        types = []
        for i, layer in enumerate(adapter.blocks(model)):
            attn = getattr(layer, "self_attn", None)
            if attn is not None and hasattr(attn, "layer_idx"):
                attn.layer_idx = i
            types.append(_layer_type(layer))
        if getattr(model.config, "layer_types", None) is not None:
            model.config.layer_types = types


def save_variant(model: nn.Module, folder: Path | str, info: dict | None = None) -> Path:
    """Write `model` (a pruned copy of a library model) as a `save_pretrained` folder, atomically: the
    config says how many layers it has; linearised MLPs are listed in `distillery_ppcl.json` (with `info`)."""
    from distillery.models.mmdit import ResidualLinear
    adapter = hf_adapter(model)
    folder = Path(folder)
    update = config_update(model, adapter)
    _renumber(model, adapter)
    linear = [[i, attr] for i, b in enumerate(adapter.blocks(model)) for attr in adapter.mlp_attrs
              if isinstance(getattr(b, attr, None), ResidualLinear)]
    if hasattr(model, "register_to_config"):
        model.register_to_config(**update)
    else:
        for k, v in update.items():
            setattr(model.config, k, v)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / VARIANT_FILE).write_text(json.dumps({"class": type(model).__name__, "linear_mlps": linear,
                                                **(info or {})}, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def load_variant(folder: Path | str) -> nn.Module:
    """A variant folder written by `save_variant`, its linear projectors included (a depth-only variant
    loads with plain `from_pretrained` too)."""
    from safetensors.torch import load_file
    from distillery.models.mmdit import ResidualLinear
    offline()
    folder = Path(folder)
    meta = json.loads((folder / VARIANT_FILE).read_text())
    lib = library_of(folder)
    if lib == "diffusers":
        import diffusers
        cls = getattr(diffusers, meta["class"])
        model = cls.from_config(cls.load_config(folder))
    else:
        from transformers import AutoConfig, AutoModelForCausalLM
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    adapter = hf_adapter(model)
    blocks = adapter.blocks(model)
    for i, attr in meta["linear_mlps"]:
        dim = next(p for p in getattr(blocks[i], attr).parameters()).shape[-1] if attr else None
        setattr(blocks[i], attr, ResidualLinear(dim))
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    tied = tied if isinstance(tied, set) else set(tied)
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise DataError(f"{folder}: weights do not match the variant ({len(missing)} missing, e.g. {missing[:3]}; "
                        f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.float().eval()


def folder_files(path: Path | str, subfolder: str | None = None) -> dict[str, Any]:
    """The files of a model folder with their sizes: what the lineage records about a user's model."""
    folder = Path(path) / (subfolder or "")
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def forward_output(model: nn.Module, kwargs: dict) -> torch.Tensor:
    """The model's own forward on `kwargs`: a diffusers model's sample, a language model's logits."""
    if type(model).__module__.startswith("diffusers."):
        return model(**kwargs, return_dict=False)[0]
    return model(**kwargs, use_cache=False).logits


def resolve_device(name: str) -> torch.device:
    """`auto` = the GPU when there is one, else the CPU; `cuda` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(f"device: {name} but torch sees no GPU here; use device: auto or cpu")
    return torch.device(name)


DIFFUSERS_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel", "QwenImageTransformer2DModel")


def check_folder(path: Path | str, subfolder: str | None = None) -> str:
    """Cheap check of a model folder before any work: it exists, holds a config of a supported class
    (weights are not read). Returns the class name."""
    folder = Path(path) / (subfolder or "")
    if not folder.is_dir():
        hint = "" if subfolder else "; for a pipeline folder set ppcl_teacher.subfolder (e.g. transformer)"
        raise ParamsError(f"ppcl_teacher.model = {str(path)!r}: folder {folder} not found{hint}")
    try:
        lib = library_of(folder)
    except DataError as err:
        raise ParamsError(str(err)) from None
    cfg = json.loads((folder / "config.json").read_text())
    if lib == "diffusers":
        name = cfg.get("_class_name", "")
        if name not in DIFFUSERS_CLASSES:
            raise ParamsError(f"{folder}: {name or 'this diffusers model'} has no PPCL adapter; supported: {SUPPORTED}")
        return name
    archs = cfg.get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs) or cfg.get("model_type") not in DECODER_TYPES:
        raise ParamsError(f"{folder}: {', '.join(archs) or cfg.get('model_type')} (model_type "
                          f"{cfg.get('model_type')!r}) has no PPCL adapter; supported: {SUPPORTED}")
    if cfg.get("model_type") == "mistral" and cfg.get("sliding_window") is not None:
        raise ParamsError(f"{folder}: Mistral with a sliding window (every layer windowed) has no PPCL adapter yet; "
                          f"supported: {SUPPORTED}")
    return archs[0]


@torch.no_grad()
def outputs(model: nn.Module, inputs, batch_size: int = 32) -> torch.Tensor:
    """The model's own forward on `ModelInputs`, batch by batch (no hidden states kept), on the CPU."""
    model.eval()
    return torch.cat([forward_output(model, inputs.take(slice(i, i + batch_size)).kwargs()).float().cpu()
                      for i in range(0, len(inputs), batch_size)])
