"""The digits teacher as a real diffusers class: `SD3Transformer2DModel` behind a tiny text encoder.

`DigitsDenoiser(x_t, t, tokens) -> velocity` has the signature every PPCL denoiser has (see
`flow_matching`): `TextEmbedder` turns caption ids into SD3's `encoder_hidden_states` and
`pooled_projections`, and the transformer runs with `timestep = 1000 t`. `model_inputs` gives the
transformer's own keyword inputs, so compression code can calibrate, prune or export the transformer
alone. A denoiser is saved as a pipeline-like folder: `transformer/` (diffusers' `save_pretrained`) and
`text_encoder.safetensors` + `text_encoder.json`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from distillery.models.factory import import_module
from distillery.ppcl.text import MAX_LEN, VOCAB_SIZE

import_module("torchvision")  # diffusers imports transformers, which imports torchvision: see factory's note
from diffusers import SD3Transformer2DModel

TEXT_WEIGHTS, TEXT_CONFIG, TRANSFORMER = "text_encoder.safetensors", "text_encoder.json", "transformer"


class TextEmbedder(nn.Module):
    """Caption ids (n, max_len) -> `encoder_hidden_states` (n, max_len, dim) (word + position embeddings)
    and `pooled_projections` (n, pooled_dim) (a linear map of the mean over the non-pad words; an
    all-pad, empty caption pools to zeros before it)."""

    def __init__(self, vocab_size: int, dim: int, pooled_dim: int, max_len: int = MAX_LEN):
        super().__init__()
        self.config = {"vocab_size": vocab_size, "dim": dim, "pooled_dim": pooled_dim, "max_len": max_len}
        self.words = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.pool = nn.Linear(dim, pooled_dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        words = self.words(tokens)
        mask = (tokens != 0).to(words.dtype).unsqueeze(-1)
        pooled = (words * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return words + self.pos[:, :tokens.shape[1]], self.pool(pooled)


def sd3_config(width: float = 1.0, depth: int = 12, image_size: int = 8, in_channels: int = 1,
               heads: int = 4, patch_size: int = 2, qk_norm: str | None = None) -> dict:
    """`SD3Transformer2DModel(**cfg)` kwargs: hidden size 64 * `width` (`heads` heads), `depth` joint blocks,
    the text and pooled widths equal to the hidden size. `pos_embed_max_size` is the patch grid's side,
    so the fixed sin-cos position table is exactly the grid (PatchEmbed crops its centre)."""
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
    head_dim = max(1, round(64 * width / heads))
    hidden = heads * head_dim
    return {"sample_size": image_size, "patch_size": patch_size, "in_channels": in_channels,
            "out_channels": in_channels, "num_layers": depth, "attention_head_dim": head_dim,
            "num_attention_heads": heads, "joint_attention_dim": hidden, "caption_projection_dim": hidden,
            "pooled_projection_dim": hidden, "pos_embed_max_size": image_size // patch_size, "qk_norm": qk_norm}


class DigitsDenoiser(nn.Module):
    """`forward(x_t, t, tokens) -> velocity`: `text_encoder` then the SD3 `transformer` at timestep 1000 t."""

    def __init__(self, text_encoder: TextEmbedder, transformer: SD3Transformer2DModel):
        super().__init__()
        self.text_encoder = text_encoder
        self.transformer = transformer

    def _inputs(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        text, pooled = self.text_encoder(torch.as_tensor(tokens, device=x.device))
        timestep = (torch.as_tensor(t, dtype=x.dtype, device=x.device) * 1000).expand(x.shape[0])
        return {"hidden_states": x, "encoder_hidden_states": text, "pooled_projections": pooled, "timestep": timestep}

    @torch.no_grad()
    def model_inputs(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The keyword inputs `forward` calls the transformer with (besides `return_dict=False`)."""
        return self._inputs(x, t, tokens)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.transformer(**self._inputs(x, t, tokens), return_dict=False)[0]

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, g = self.transformer.config, torch.Generator().manual_seed(0)
        x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
        tokens = torch.randint(1, self.text_encoder.config["vocab_size"],
                               (batch, self.text_encoder.config["max_len"]), generator=g)
        return x, torch.rand(batch, generator=g), tokens


def build_digits_denoiser(width: float = 1.0, depth: int = 12, image_size: int = 8, in_channels: int = 1,
                          seed: int = 0, **transformer_kwargs) -> DigitsDenoiser:
    """A freshly initialised denoiser (seeded); `transformer_kwargs` go to `sd3_config` (heads, qk_norm, ...)."""
    cfg = sd3_config(width, depth, image_size, in_channels, **transformer_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = TextEmbedder(VOCAB_SIZE, cfg["joint_attention_dim"], cfg["pooled_projection_dim"])
        transformer = SD3Transformer2DModel(**cfg)
    return DigitsDenoiser(text, transformer)


def save_denoiser(model: DigitsDenoiser, folder: Path | str) -> None:
    """Write `folder/transformer/` and the text encoder's weights and args, replacing `folder` as a whole:
    everything goes to a temporary sibling first, so `folder` is never half-written."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    old, moved = tmp.with_suffix(".old"), False
    try:
        model.transformer.save_pretrained(tmp / TRANSFORMER, safe_serialization=True)
        state = {k: v.detach().contiguous() for k, v in model.text_encoder.state_dict().items()}
        save_file(state, str(tmp / TEXT_WEIGHTS))
        (tmp / TEXT_CONFIG).write_text(json.dumps(model.text_encoder.config, indent=2) + "\n")
        if folder.exists():
            os.replace(folder, old)  # a folder cannot be renamed over a non-empty one: move the old aside
            moved = True
        os.replace(tmp, folder)
    except BaseException:
        if moved and not folder.exists():
            os.replace(old, folder)  # put the previous save back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def load_denoiser(folder: Path | str, transformer: nn.Module | None = None) -> DigitsDenoiser:
    """The denoiser saved in `folder` (in eval mode); `transformer` replaces the saved one (e.g. a pruned
    variant), so any variant runs with the teacher's text encoder."""
    folder = Path(folder)
    text = TextEmbedder(**json.loads((folder / TEXT_CONFIG).read_text()))
    text.load_state_dict(load_file(str(folder / TEXT_WEIGHTS)))
    if transformer is None:
        transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder=TRANSFORMER, low_cpu_mem_usage=False)
    return DigitsDenoiser(text, transformer).eval()
