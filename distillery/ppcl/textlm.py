"""A small byte-level causal LM (Hugging Face `LlamaForCausalLM`) trained here, for PPCL on LLMs.

The corpus is Python's own help texts (`pydoc_data.topics`, ~470 KB of English, no download); tokens
are its utf-8 bytes (vocab 256, no tokenizer). The held-out split is the contiguous tail of the corpus.
Perplexity counts every position t < T-1 of a window predicting token t+1.

    train, heldout = split_corpus(corpus_bytes())
    model = build_llama(llama_config(), seed=0)
    history = train_lm(model, train, steps=900, lr=3e-3, batch_size=16, seq_len=128, seed=0)  # ~5 min, 1 thread
    ids = heldout_chunks(heldout, 128, 256)
    lm_metrics(model, ids)                                    # {"nll", "perplexity"}
    compare_lm(logits(model, ids), logits(variant, ids), ids)  # agreement, perplexity ratio
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from distillery.models.factory import import_module

VOCAB = 256


def _llama():
    # transformers imports torchvision, whose PyPI wheel fails next to a CPU torch; see factory.import_module
    return import_module("transformers.models.llama.modeling_llama")


def corpus_bytes() -> bytes:
    """The pydoc help topics, sorted by key, joined by blank lines, as utf-8 bytes (deterministic)."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def split_corpus(data: bytes, heldout: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids, held-out ids), int64; the held-out part is the contiguous tail, so windows never overlap."""
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = len(ids) - round(len(ids) * heldout)
    return ids[:cut].clone(), ids[cut:].clone()


def _windows(ids: torch.Tensor, seq_len: int, n: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - seq_len + 1, (n,), generator=gen)
    return ids[starts[:, None] + torch.arange(seq_len)]


def chunks(ids: torch.Tensor, seq_len: int, n: int, seed: int) -> torch.Tensor:
    """(n, seq_len) int64 windows at random (seeded) starts, possibly overlapping."""
    return _windows(ids, seq_len, n, torch.Generator().manual_seed(seed))


def heldout_chunks(ids: torch.Tensor, seq_len: int, n: int | None = None) -> torch.Tensor:
    """(n, seq_len) non-overlapping consecutive windows from the start (all that fit when n is None)."""
    fit = len(ids) // seq_len
    n = fit if n is None else n
    if n > fit:
        raise ValueError(f"{n} windows of {seq_len} do not fit in {len(ids)} tokens (at most {fit})")
    return ids[: n * seq_len].reshape(n, seq_len).clone()


def llama_config(hidden: int = 128, layers: int = 8, heads: int = 4, seq_len: int = 128):
    """`LlamaConfig` of a byte-level decoder: vocab 256, MLP 3x hidden, tied embeddings, SDPA attention."""
    return _llama().LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max(seq_len, 128),
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False,
        attn_implementation="sdpa")


def build_llama(config, seed: int = 0) -> nn.Module:
    """A freshly initialised `LlamaForCausalLM` (seeded)."""
    torch.manual_seed(seed)
    return _llama().LlamaForCausalLM(config)


def load_llama(path) -> nn.Module:
    """`LlamaForCausalLM.from_pretrained(path)` in eval mode."""
    return _llama().LlamaForCausalLM.from_pretrained(path).eval()


def drop_layers(model: nn.Module, drop: Sequence[int]) -> nn.Module:
    """A deep copy of a Llama-style model without decoder layers `drop` (no retraining)."""
    out = copy.deepcopy(model)
    keep = [layer for i, layer in enumerate(out.model.layers) if i not in set(drop)]
    out.model.layers = nn.ModuleList(keep)
    out.config.num_hidden_layers = len(keep)
    for i, layer in enumerate(keep):  # cache slots follow the new positions
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = i
    if getattr(out.config, "layer_types", None) is not None:
        out.config.layer_types = [t for i, t in enumerate(out.config.layer_types) if i not in set(drop)]
    return out


def _next_token_nll(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                           reduction=reduction)


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """LR factor of step `step` (0-based): linear up to 1 over `warmup` steps, then cosine down to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup + 1) / max(1, steps - warmup + 1)))


def train_lm(model: nn.Module, train_ids: torch.Tensor, steps: int, lr: float = 3e-3, batch_size: int = 16,
             seq_len: int = 128, seed: int = 0, warmup_ratio: float = 0.05, weight_decay: float = 0.01,
             log_every: int | None = None, progress: bool = True) -> dict:
    """AdamW, linear warmup then cosine decay to 0, grad-norm clip 1, random windows (seeded).
    Returns {"step": [...], "loss": [mean train loss since the previous entry], "seconds": [...], "lr": [...]}."""
    log_every = log_every or max(1, steps // 50)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    warmup = max(1, round(warmup_ratio * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup))
    history: dict[str, list] = {"step": [], "loss": [], "seconds": [], "lr": []}
    model.train()
    start, running, count = time.perf_counter(), 0.0, 0
    bar = tqdm(range(steps), desc="train lm", disable=not progress)
    for step in bar:
        x = _windows(train_ids, seq_len, batch_size, gen)
        loss = _next_token_nll(model(input_ids=x, use_cache=False).logits, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        current_lr = opt.param_groups[0]["lr"]
        opt.step()
        schedule.step()
        running, count = running + loss.item(), count + 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            history["step"].append(step + 1)
            history["loss"].append(running / count)
            history["seconds"].append(time.perf_counter() - start)
            history["lr"].append(current_lr)
            bar.set_postfix(loss=f"{running / count:.3f}")
            running, count = 0.0, 0
    model.eval()
    return history


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(n, T, vocab) float32 logits of a causal LM on token windows `ids` (n, T), in eval mode."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(input_ids=ids[i:i + batch_size], use_cache=False).logits.float()
                     for i in range(0, len(ids), batch_size)])
    model.train(was_training)
    return out


def perplexity(logits_: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean next-token NLL) over every position t < T-1 of every window."""
    return math.exp(_next_token_nll(logits_, ids).item())


@torch.no_grad()
def lm_metrics(model: nn.Module, ids: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """{"nll": mean next-token NLL (nats), "perplexity": exp(nll)} on windows `ids` (n, T)."""
    nll = _next_token_nll(logits(model, ids, batch_size), ids).item()
    return {"nll": nll, "perplexity": math.exp(nll)}


def compare_lm(teacher_logits: torch.Tensor, variant_logits: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """A variant against its teacher on the same windows: share of predicting positions (t < T-1) whose
    argmax agrees, both perplexities and their ratio (variant / teacher)."""
    agree = (teacher_logits[:, :-1].argmax(-1) == variant_logits[:, :-1].argmax(-1)).float().mean().item()
    pt, pv = perplexity(teacher_logits, ids), perplexity(variant_logits, ids)
    return {"next_token_agreement": agree, "perplexity_teacher": pt, "perplexity_variant": pv,
            "perplexity_ratio": pv / pt}
