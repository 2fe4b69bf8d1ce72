"""Make the README's PPCL worked example: a user's own transformers model in a folder, and its inputs
captured while the user's own code runs it.

    python examples/own_transformer/make_example.py

plays the user: trains a small byte-level `Qwen2ForCausalLM` (8 layers, hidden 128) for a few minutes on
Python's own help texts and saves it with `save_pretrained` to `examples/own_transformer/qwen2/`; then
runs it over text windows as an evaluation script would, inside `distillery.ppcl.capture.capture`, which
records every forward's keyword arguments to `examples/own_transformer/inputs.pt`. Point
`ppcl_teacher.model` / `ppcl_teacher.inputs` at those two paths and run `distillery run ppcl`.
"""
from pathlib import Path

import torch

import distillery.ppcl.hf  # noqa: F401  (declares torchvision's ops, so transformers imports beside the CPU torch)
from distillery.ppcl.capture import capture
from distillery.ppcl.textlm import chunks, corpus_bytes, lm_metrics, split_corpus, train_lm

HERE = Path(__file__).resolve().parent
SEQ = 128


def users_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=8,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                        tie_word_embeddings=True, use_cache=False))


def main() -> None:
    torch.set_num_threads(1)  # one core trains best on a shared 2-core machine
    train, held = split_corpus(corpus_bytes())
    model = users_model()
    train_lm(model, train, steps=900, lr=3e-3, batch_size=16, seq_len=SEQ, seed=0)  # stands in for the user's training
    model.save_pretrained(HERE / "qwen2")
    print(f"Qwen2ForCausalLM: held-out perplexity {lm_metrics(model, chunks(held, SEQ, 256, seed=1))['perplexity']:.3f}")
    # the user's own evaluation loop, recorded: every forward call's keyword arguments
    with capture(model) as rec, torch.no_grad():
        for batch in chunks(train, SEQ, 1536, seed=2).split(64):
            model(input_ids=batch)
    rec.save(HERE / "inputs.pt")
    print(f"captured {len(rec.inputs())} inputs -> {HERE / 'inputs.pt'}")


if __name__ == "__main__":
    main()
