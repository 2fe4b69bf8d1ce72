import math

import pytest
import torch

from distillery.ppcl.textlm import (VOCAB, build_llama, chunks, compare_lm, corpus_bytes, drop_layers,
                                    heldout_chunks, llama_config, lm_metrics, load_llama, logits, split_corpus,
                                    train_lm)


@pytest.fixture(scope="module")
def data():
    return split_corpus(corpus_bytes())


def tiny(layers: int = 2, seed: int = 0):
    return build_llama(llama_config(hidden=32, layers=layers, heads=2, seq_len=32), seed=seed)


def test_corpus_is_nonempty_english_and_deterministic():
    data = corpus_bytes()
    assert len(data) > 100_000 and data == corpus_bytes()
    assert b"the" in data and data.decode("utf-8")


def test_split_is_the_contiguous_tail_with_the_right_sizes(data):
    train, heldout = data
    raw = corpus_bytes()
    assert train.dtype == heldout.dtype == torch.int64
    assert len(train) + len(heldout) == len(raw) and len(heldout) == round(0.1 * len(raw))
    assert bytes(torch.cat([train, heldout]).to(torch.uint8).tolist()) == raw  # disjoint, in order
    assert int(train.max()) < VOCAB and int(heldout.min()) >= 0


def test_windows(data):
    train, heldout = data
    a, b = chunks(train, 16, 5, seed=1), chunks(train, 16, 5, seed=1)
    assert a.shape == (5, 16) and a.dtype == torch.int64 and torch.equal(a, b)
    assert not torch.equal(a, chunks(train, 16, 5, seed=2))
    h = heldout_chunks(heldout, 16, 3)
    assert torch.equal(h.reshape(-1), heldout[:48])
    assert len(heldout_chunks(heldout, 16)) == len(heldout) // 16
    with pytest.raises(ValueError):
        heldout_chunks(heldout, 16, len(heldout))


def test_config():
    config = llama_config()
    assert config.vocab_size == 256 and config.intermediate_size == 3 * 128 and config.tie_word_embeddings
    assert config.num_hidden_layers == 8 and config.max_position_embeddings >= 128
    assert config._attn_implementation == "sdpa"


def test_training_lowers_the_loss(data):
    torch.set_num_threads(1)
    train, heldout = data
    model = tiny()
    ids = heldout_chunks(heldout, 32, 8)
    before = lm_metrics(model, ids)["perplexity"]
    history = train_lm(model, train, steps=20, lr=1e-2, batch_size=8, seq_len=32, seed=0, log_every=5,
                       progress=False)
    assert history["step"] == [5, 10, 15, 20] and len(history["seconds"]) == 4
    assert history["loss"][-1] < history["loss"][0] - 0.5
    assert not model.training and lm_metrics(model, ids)["perplexity"] < before


def test_uniform_logits_have_perplexity_256():
    ids = torch.randint(0, VOCAB, (3, 10))
    out = compare_lm(torch.zeros(3, 10, VOCAB), torch.zeros(3, 10, VOCAB), ids)
    assert out["perplexity_teacher"] == pytest.approx(256, rel=1e-5)


def test_identical_logits_agree_fully_and_a_different_model_does_not():
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    a = torch.randn(4, 12, VOCAB, generator=torch.Generator().manual_seed(1))
    same = compare_lm(a, a.clone(), ids)
    assert same["next_token_agreement"] == 1.0 and same["perplexity_ratio"] == pytest.approx(1.0)
    other = compare_lm(a, torch.randn(4, 12, VOCAB), ids)
    assert other["next_token_agreement"] < 0.2 and other["perplexity_variant"] != other["perplexity_teacher"]
    nll = -torch.log_softmax(a[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean().item()
    assert same["perplexity_teacher"] == pytest.approx(math.exp(nll), rel=1e-5)  # shifted targets


def test_save_and_load_round_trip(tmp_path, data):
    model = tiny(seed=3)
    ids = heldout_chunks(data[1], 32, 4)
    model.save_pretrained(tmp_path)
    assert torch.allclose(logits(load_llama(tmp_path), ids), logits(model, ids), atol=1e-5)


def test_drop_layers_leaves_the_original_alone():
    model = tiny(layers=3)
    ids = torch.randint(0, VOCAB, (2, 16))
    ref = logits(model, ids)
    pruned = drop_layers(model, [1])
    assert len(pruned.model.layers) == pruned.config.num_hidden_layers == 2
    assert len(model.model.layers) == model.config.num_hidden_layers == 3
    assert torch.equal(logits(model, ids), ref) and not torch.allclose(logits(pruned, ids), ref)
