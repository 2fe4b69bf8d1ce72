"""The diffusers-backed digits denoiser: shapes, the transformer's own inputs, save / load, training."""
import json

import numpy as np
import pytest
import torch

from distillery.ppcl.digits_hf import (SD3Transformer2DModel, TextEmbedder, build_digits_denoiser, load_denoiser,
                                       save_denoiser, sd3_config)
from distillery.ppcl.flow_matching import FlowConfig, train_flow_matching
from distillery.ppcl.text import MAX_LEN, VOCAB_SIZE, caption_tokens


@pytest.fixture
def model():
    return build_digits_denoiser(width=0.5, depth=2, seed=0).eval()


def inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.as_tensor(caption_tokens(np.arange(n) % 10, seed))
    return torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g), tokens


def test_config_and_shapes(model):
    cfg = sd3_config()
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == 64 and cfg["num_layers"] == 12
    assert cfg["pos_embed_max_size"] == 4 and cfg["sample_size"] == 8
    assert isinstance(model.transformer, SD3Transformer2DModel) and len(model.transformer.transformer_blocks) == 2
    x, t, tokens = inputs(3)
    assert model(x, t, tokens).shape == x.shape
    got = model.model_inputs(x, t, tokens)
    assert set(got) == {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"}
    assert got["encoder_hidden_states"].shape == (3, MAX_LEN, 32) and got["pooled_projections"].shape == (3, 32)
    assert torch.equal(got["timestep"], t * 1000) and not got["encoder_hidden_states"].requires_grad


def test_model_inputs_reproduce_forward(model):
    x, t, tokens = inputs(4)
    with torch.no_grad():
        direct = model.transformer(**model.model_inputs(x, t, tokens), return_dict=False)[0]
        assert torch.equal(direct, model(x, t, tokens))
        assert not torch.allclose(model(x, t, tokens), model(x, t, torch.zeros_like(tokens)))  # the text matters


def test_empty_caption_is_finite(model):
    x, t, tokens = inputs(2)
    empty = torch.zeros_like(tokens)
    _, pooled = model.text_encoder(empty)
    assert torch.isfinite(pooled).all() and torch.allclose(pooled, model.text_encoder.pool.bias.expand_as(pooled))
    with torch.no_grad():
        assert torch.isfinite(model(x, t, empty)).all()


def test_save_load_round_trip(model, tmp_path):
    folder = tmp_path / "teacher"
    save_denoiser(build_digits_denoiser(width=0.5, depth=1, seed=1), folder)  # overwritten as a whole
    save_denoiser(model, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]  # no temporary sibling left
    assert (folder / "transformer" / "config.json").exists()
    assert json.loads((folder / "text_encoder.json").read_text())["vocab_size"] == VOCAB_SIZE
    loaded = load_denoiser(folder)
    assert len(loaded.transformer.transformer_blocks) == 2
    x, t, tokens = inputs(3)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, tokens), model(x, t, tokens))
    other = build_digits_denoiser(width=0.5, depth=2, seed=5).transformer.eval()
    swapped = load_denoiser(folder, transformer=other)
    assert swapped.transformer is other
    assert torch.equal(swapped.text_encoder.words.weight, model.text_encoder.words.weight)


def test_save_failure_keeps_the_previous_folder(model, tmp_path, monkeypatch):
    folder = tmp_path / "teacher"
    save_denoiser(model, folder)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("distillery.ppcl.digits_hf.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_denoiser(build_digits_denoiser(width=0.5, depth=1, seed=1), folder)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]
    assert len(load_denoiser(folder).transformer.transformer_blocks) == 2


def test_text_embedder_masks_pad_tokens():
    emb = TextEmbedder(VOCAB_SIZE, 8, 4)
    tokens = torch.tensor([[5, 3, 0, 0, 0, 0]])
    _, pooled = emb(tokens)
    with torch.no_grad():
        expected = emb.pool(emb.words(tokens[:, :2]).mean(1))
    assert torch.allclose(pooled, expected)


def test_flow_matching_training_lowers_the_loss(model):
    torch.manual_seed(0)
    y = torch.arange(64) % 10
    x = torch.where(torch.rand(64, 1, 8, 8) > 0.5, 1.0, -1.0) * 0.5 + (y.view(-1, 1, 1, 1) / 10.0)
    hist = train_flow_matching(model.train(), x, y, FlowConfig(steps=30, lr=3e-3, batch_size=16, ema_decay=0.0,
                                                               log_every=10))
    losses = [s["loss"] for s in hist.steps]
    assert len(losses) == 3 and np.isfinite(losses).all()
    assert losses[-1] < 0.9 * losses[0]
