"""How close a pruned variant stays to its teacher when no task metric exists: the final output on
held-out inputs, compared sample by sample.

`cosine`: mean over samples of the cosine similarity of the flattened outputs (1 = same direction);
`relative_error`: ||variant - teacher|| / ||teacher|| over the whole set (0 = identical). For language
models `distillery.ppcl.textlm.compare_lm` adds next-token agreement and the perplexity ratio.
"""
from __future__ import annotations

import math

import torch


def output_fidelity(teacher: torch.Tensor, variant: torch.Tensor) -> dict[str, float]:
    if teacher.shape != variant.shape:
        raise ValueError(f"outputs differ in shape: teacher {tuple(teacher.shape)}, variant {tuple(variant.shape)}")
    a = teacher.reshape(len(teacher), -1).double()
    b = variant.reshape(len(variant), -1).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
    rel = (b - a).norm() / a.norm().clamp_min(1e-12)
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "relative_error": float(rel)}


class FidelityMeter:
    """`output_fidelity` (and, for a language model, perplexities and next-token agreement) accumulated batch
    by batch, so that no whole set of outputs is kept. Language-model figures count position t predicting
    token t+1 where both are real tokens (`attention_mask`, when given, is 1 at both)."""

    def __init__(self, language_model: bool = False):
        self.lm = language_model
        self.cos: list[torch.Tensor] = []
        self.diff2 = self.ref2 = 0.0
        self.nll_t = self.nll_v = 0.0
        self.agree = self.count = 0

    @torch.no_grad()
    def update(self, teacher: torch.Tensor, variant: torch.Tensor, ids: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> None:
        if teacher.shape != variant.shape:
            raise ValueError(f"outputs differ in shape: teacher {tuple(teacher.shape)}, variant {tuple(variant.shape)}")
        a = teacher.reshape(len(teacher), -1).double()
        b = variant.reshape(len(variant), -1).double()
        self.cos.append(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).cpu())
        self.diff2 += float((b - a).pow(2).sum())
        self.ref2 += float(a.pow(2).sum())
        if self.lm and ids is not None:
            keep = torch.ones_like(ids[:, 1:], dtype=torch.bool) if mask is None else (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
            target = ids[:, 1:][keep]
            lt, lv = teacher[:, :-1][keep].double(), variant[:, :-1][keep].double()
            self.nll_t += float(torch.nn.functional.cross_entropy(lt, target, reduction="sum"))
            self.nll_v += float(torch.nn.functional.cross_entropy(lv, target, reduction="sum"))
            self.agree += int((lt.argmax(-1) == lv.argmax(-1)).sum())
            self.count += int(keep.sum())

    def result(self) -> dict[str, float]:
        cos = torch.cat(self.cos)
        out = {"cosine": float(cos.mean()), "cosine_min": float(cos.min()),
               "relative_error": (self.diff2 / max(self.ref2, 1e-300)) ** 0.5}
        if self.lm and self.count:
            pt, pv = math.exp(self.nll_t / self.count), math.exp(self.nll_v / self.count)
            out |= {"next_token_agreement": self.agree / self.count, "perplexity_teacher": pt,
                    "perplexity_variant": pv, "perplexity_ratio": pv / pt}
        return out
