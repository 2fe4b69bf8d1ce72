"""Captions for digit images and a word-level tokenizer built from the caption templates.

The vocabulary is closed (every word any template can produce), so a caption never meets an
unknown word; id 0 pads and an all-pad caption is the "empty prompt" of classifier-free guidance.
"""
from __future__ import annotations

import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten {word}",
    "the digit {num}",
    "a picture of a {word}",
    "an image of the number {word}",
    "number {num}",
    "{word}",
)
PAD, UNK = "<pad>", "<unk>"
MAX_LEN = 6  # the longest template ("an image of the number seven") has six words


def _vocabulary() -> tuple[str, ...]:
    words = set()
    for digit in range(10):
        for template in TEMPLATES:
            words.update(template.format(word=WORDS[digit], num=digit).split())
    return (PAD, UNK, *sorted(words))


VOCAB = _vocabulary()
TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}
VOCAB_SIZE = len(VOCAB)


def caption(digit: int, template: int = 0) -> str:
    """The caption of `digit` in template number `template`."""
    return TEMPLATES[template % len(TEMPLATES)].format(word=WORDS[digit], num=digit)


def tokenize(texts: list[str] | str, max_len: int = MAX_LEN) -> np.ndarray:
    """Word ids, int64 (n, max_len), padded with 0 and truncated at `max_len`."""
    texts = [texts] if isinstance(texts, str) else texts
    out = np.zeros((len(texts), max_len), np.int64)
    for i, text in enumerate(texts):
        ids = [TOKEN_ID.get(w, TOKEN_ID[UNK]) for w in text.lower().split()][:max_len]
        out[i, :len(ids)] = ids
    return out


def caption_tokens(labels: np.ndarray, seed: int, max_len: int = MAX_LEN) -> np.ndarray:
    """A caption for each label, the template drawn at random (seeded), tokenized."""
    templates = np.random.default_rng(seed).integers(0, len(TEMPLATES), len(labels))
    return tokenize([caption(int(d), int(t)) for d, t in zip(labels, templates)], max_len)
