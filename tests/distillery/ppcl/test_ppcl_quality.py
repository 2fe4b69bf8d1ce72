import numpy as np
import torch

from distillery.ppcl.quality import adherence, prompt_noise, prompt_set, psnr, sample_grid, sample_prompts


def test_prompt_set_and_noise_are_fixed():
    labels, tokens = prompt_set(3, seed=2)
    assert labels.tolist() == [d for d in range(10) for _ in range(3)]
    assert (tokens == prompt_set(3, seed=2)[1]).all() and tokens.shape[0] == 30
    assert torch.equal(prompt_noise(30, seed=5), prompt_noise(30, seed=5))


def test_adherence_with_a_known_classifier():
    labels = torch.arange(10).repeat(3)
    images = torch.zeros(30, 1, 8, 8)
    images[:, 0, 0, 0] = labels.float()  # the "digit" is written in the first pixel
    reader = lambda x: torch.nn.functional.one_hot(x[:, 0, 0, 0].round().long(), 10).float()  # noqa: E731
    assert adherence(images, labels, reader) == 1.0
    assert adherence(images, (labels + 1) % 10, reader) == 0.0
    assert adherence(images, labels, reader, preprocess=lambda x: x * 0) == 0.1  # all read as 0
    assert adherence(images, labels, reader, batch_size=7) == 1.0


def test_psnr():
    a = torch.zeros(4, 1, 8, 8)
    assert psnr(a, a) == float("inf")
    assert abs(psnr(a, a + 0.2) - 10 * np.log10(4 / 0.04)) < 1e-5  # range 2 ([-1, 1]), mse 0.04


def test_sample_grid_layout():
    images = torch.linspace(-1, 1, 12).view(12, 1, 1, 1).expand(12, 1, 4, 4)
    grid = sample_grid(images, nrow=5, pad=1)
    assert grid.shape == (3 * 5 + 1, 5 * 5 + 1) and grid.min() >= 0 and grid.max() <= 1
    assert grid[1, 1] == 0.0 and grid[1 + 5 * 2, 1 + 5 * 1] == 1.0  # first and last (12th) image
    assert sample_grid(torch.zeros(2, 3, 4, 4), nrow=2).shape == (6, 11, 3)


def test_sample_prompts_is_deterministic(mmdit):
    labels, tokens = prompt_set(1)
    noise = prompt_noise(10)
    a = sample_prompts(mmdit, tokens, noise, steps=3, guidance=2.0, batch_size=4)
    b = sample_prompts(mmdit, tokens, noise, steps=3, guidance=2.0)
    assert a.shape == (10, 1, 8, 8) and torch.allclose(a, b, atol=1e-5) and a.abs().max() <= 1
