import numpy as np
import torch

from distillery.models import build_model
from distillery.training import FitConfig, accuracy, fit


def toy_data(n=96, seed=0):
    """Four classes told apart by which image quadrant is bright: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    x = rng.normal(0, 0.3, (n, 1, 8, 8)).astype(np.float32)
    for i, c in enumerate(y):
        x[i, 0, (c // 2) * 4:(c // 2) * 4 + 4, (c % 2) * 4:(c % 2) * 4 + 4] += 2.0
    return x, y.astype(np.int64)


def toy_model():
    torch.manual_seed(0)
    return build_model({"arch": "toy", "width": 0.5, "in_channels": 1, "num_classes": 4})


def test_fit_learns_and_keeps_the_best_val_weights():
    train, val = toy_data(), toy_data(48, seed=1)
    model = toy_model()
    before = accuracy(model, *val)
    hist = fit(model, train, val, FitConfig(epochs=6, lr=0.05, batch_size=16, patience=3))
    assert hist.best_val_acc >= 0.9 > before
    assert accuracy(model, *val) == hist.best_val_acc


def test_resume_after_a_crash_gives_the_same_model_as_an_uninterrupted_run():
    train, val = toy_data(), toy_data(48, seed=1)
    cfg = FitConfig(epochs=4, lr=0.05, batch_size=16, patience=None)
    straight = toy_model()
    fit(straight, train, val, cfg)

    saved = {}

    def crash_after_epoch_1(epoch, model, state, hist):
        saved["state"] = state
        if epoch == 1:
            raise KeyboardInterrupt  # the process dies here

    try:
        fit(toy_model(), train, val, cfg, on_epoch=crash_after_epoch_1)
    except KeyboardInterrupt:
        pass
    resumed = toy_model()
    hist = fit(resumed, train, val, cfg, state=saved["state"])
    assert len(hist.epochs) == 4
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
