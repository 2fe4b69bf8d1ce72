"""How close a pruned variant stays to its teacher when no task metric exists: the final output on
held-out inputs, compared sample by sample.

`cosine`: mean over samples of the cosine similarity of the flattened outputs (1 = same direction);
`relative_error`: ||variant - teacher|| / ||teacher|| over the whole set (0 = identical). For language
models `distillery.ppcl.textlm.compare_lm` adds next-token agreement and the perplexity ratio.
"""
from __future__ import annotations

import torch


def output_fidelity(teacher: torch.Tensor, variant: torch.Tensor) -> dict[str, float]:
    if teacher.shape != variant.shape:
        raise ValueError(f"outputs differ in shape: teacher {tuple(teacher.shape)}, variant {tuple(variant.shape)}")
    a = teacher.reshape(len(teacher), -1).double()
    b = variant.reshape(len(variant), -1).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
    rel = (b - a).norm() / a.norm().clamp_min(1e-12)
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "relative_error": float(rel)}
