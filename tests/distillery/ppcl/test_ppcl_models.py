import numpy as np
import torch

from distillery.models import build_model
from distillery.ppcl.flow_matching import FlowConfig, interpolate, noisy_inputs, random_tokens, sample, train_flow_matching
from distillery.ppcl.text import MAX_LEN, PAD, TEMPLATES, VOCAB, VOCAB_SIZE, caption, caption_tokens, tokenize


def test_vocabulary_covers_every_caption_and_fits_the_default_model():
    for d in range(10):
        for k in range(len(TEMPLATES)):
            ids = tokenize(caption(d, k))[0]
            assert (ids != VOCAB.index("<unk>")).all()
            assert " ".join(VOCAB[i] for i in ids if VOCAB[i] != PAD) == caption(d, k)
    assert VOCAB_SIZE <= build_model({"arch": "mmdit"}).txt_emb.num_embeddings
    tokens = caption_tokens(np.arange(10), seed=3)
    assert tokens.shape == (10, MAX_LEN) and (tokens == caption_tokens(np.arange(10), seed=3)).all()


def test_mmdit_and_vit_shapes(mmdit, vit):
    x, t, tokens = mmdit.example_inputs(3)
    assert mmdit(x, t, tokens).shape == x.shape
    assert vit(x).shape == (3, 10)
    assert len(mmdit.blocks) == 4 and len(vit.blocks) == 4


def test_text_changes_the_velocity(mmdit):
    x, t, tokens = mmdit.example_inputs(2)
    assert not torch.allclose(mmdit(x, t, tokens), mmdit(x, t, torch.zeros_like(tokens)))


def test_interpolation_endpoints():
    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    xt, v = interpolate(x0, noise, torch.tensor([0.0, 1.0, 0.5, 0.25]))
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[1], noise[1])
    assert torch.allclose(xt[2], (x0[2] + noise[2]) / 2)
    assert torch.allclose(v, noise - x0)


def test_euler_sampler_follows_an_exact_velocity_field():
    # the field of the straight path from the noise to a fixed image lands exactly on the image
    target = torch.randn(2, 1, 8, 8)
    noise = torch.randn(2, 1, 8, 8)
    field = lambda x, t, tokens: (noise - target).repeat(len(x) // 2, 1, 1, 1)  # noqa: E731
    out = sample(field, torch.zeros(2, MAX_LEN, dtype=torch.long), noise, steps=7)
    assert torch.allclose(out, target, atol=1e-5)
    guided = sample(field, torch.zeros(2, MAX_LEN, dtype=torch.long), noise, steps=7, guidance=3.0)
    assert torch.allclose(guided, target, atol=1e-5)  # cond == uncond: guidance changes nothing


def test_flow_matching_training_reduces_the_loss():
    model = build_model({"arch": "mmdit", "width": 0.5, "depth": 2, "heads": 2})
    g = torch.Generator().manual_seed(0)
    prototypes = (torch.rand(10, 1, 8, 8, generator=g) > 0.5).float() * 2 - 1  # one image per label
    y = torch.arange(128) % 10
    t = torch.rand(128, generator=g)
    x_t, velocity = interpolate(prototypes[y], torch.randn(128, 1, 8, 8, generator=g), t)
    tokens = random_tokens(y, g)

    def held_out_loss():
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(x_t, t, tokens), velocity).item()

    before = held_out_loss()
    hist = train_flow_matching(model, prototypes[y], y, FlowConfig(steps=30, batch_size=32, lr=1e-2, log_every=10,
                                                                     ema_decay=0.5, t_sampling="uniform"))
    assert held_out_loss() < 0.9 * before
    assert len(hist.steps) == 3 and not model.training and hist.seconds > 0


def test_noisy_inputs_are_seeded():
    x, y = torch.randn(20, 1, 8, 8), torch.arange(20) % 10
    a, b = noisy_inputs(x, y, 8, seed=1), noisy_inputs(x, y, 8, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert a[0].shape == (8, 1, 8, 8) and a[1].shape == (8,) and a[2].shape == (8, MAX_LEN)
