"""Tiny random models of every class PPCL supports, saved as their library does, and inputs for them.

Random weights are made less trivial than the libraries' zero-initialised modulations (`perturb`), so
that blocks do something and pruning changes the output. Used by the library tests and the flow test."""
from __future__ import annotations

from pathlib import Path

import torch

import distillery.ppcl.hf  # noqa: F401  (lets diffusers / transformers import next to the CPU torch)

CLASSES = ("sd3", "flux", "qwen_image", "llama", "qwen2", "qwen3")
LLMS = ("llama", "qwen2", "qwen3")


def perturb(model, scale: float = 0.05, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def build(kind: str, layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "sd3":
        from diffusers import SD3Transformer2DModel
        model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=2, out_channels=2, num_layers=layers,
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                      caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=8)
    elif kind == "flux":
        from diffusers import FluxTransformer2DModel
        model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=3,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                       pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    elif kind == "qwen_image":
        from diffusers import QwenImageTransformer2DModel
        model = QwenImageTransformer2DModel(patch_size=2, in_channels=8, out_channels=2, num_layers=layers,
                                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                            axes_dims_rope=(4, 6, 6))
    elif kind in LLMS:
        import transformers
        name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[kind]
        cfg_cls, cls = getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM")
        cfg = cfg_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
        model = cls(cfg)
    else:
        raise ValueError(kind)
    return perturb(model.float(), seed=seed)


def inputs(kind: str, n: int = 8, seed: int = 0) -> dict:
    """forward kwargs for n samples."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if kind == "sd3":
        return {"hidden_states": r(n, 2, 8, 8), "encoder_hidden_states": r(n, 5, 24), "pooled_projections": r(n, 16),
                "timestep": torch.rand(n, generator=g) * 1000}
    if kind == "flux":
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.), torch.arange(4.), indexing="ij"), -1)
        return {"hidden_states": r(n, 16, 8), "encoder_hidden_states": r(n, 5, 24), "pooled_projections": r(n, 16),
                "timestep": torch.rand(n, generator=g), "img_ids": img_ids.reshape(16, 3), "txt_ids": torch.zeros(5, 3)}
    if kind == "qwen_image":
        return {"hidden_states": r(n, 16, 8), "encoder_hidden_states": r(n, 5, 24),
                "encoder_hidden_states_mask": torch.ones(n, 5, dtype=torch.long), "timestep": torch.rand(n, generator=g),
                "img_shapes": [[(1, 4, 4)]] * n}
    return {"input_ids": torch.randint(0, 64, (n, 12), generator=g)}


def save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder
