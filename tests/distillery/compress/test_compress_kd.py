"""The distillation loss: its two limits, its temperature scaling, and a frozen teacher."""
import pytest
import torch
import torch.nn.functional as F

from distillery.compress.kd import distillation_loss, kd_loss
from distillery.models import build_model
from distillery.training import FitConfig, fit


def _logits(seed, n=16, k=10):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 3


def test_alpha_zero_is_cross_entropy():
    s, t, y = _logits(0), _logits(1), torch.randint(0, 10, (16,))
    torch.testing.assert_close(kd_loss(s, t, y, temperature=4.0, alpha=0.0), F.cross_entropy(s, y))


def test_alpha_one_vanishes_for_identical_logits_and_not_otherwise():
    s, y = _logits(0), torch.randint(0, 10, (16,))
    assert kd_loss(s, s.clone(), y, temperature=4.0, alpha=1.0).abs() < 1e-6
    assert kd_loss(s, _logits(1), y, temperature=4.0, alpha=1.0) > 0.01


def test_soft_term_is_t_squared_kl_of_teacher_to_student():
    s, t, y = _logits(0), _logits(1), torch.zeros(16, dtype=torch.long)
    T = 3.0
    p_t, log_p_s = F.softmax(t / T, 1), F.log_softmax(s / T, 1)
    expected = T * T * (p_t * (p_t.log() - log_p_s)).sum(1).mean()
    torch.testing.assert_close(kd_loss(s, t, y, T, 1.0), expected)
    mixed = kd_loss(s, t, y, T, 0.3)
    torch.testing.assert_close(mixed, 0.3 * expected + 0.7 * F.cross_entropy(s, y))


def test_rejects_bad_hyperparameters():
    s, y = _logits(0), torch.zeros(16, dtype=torch.long)
    with pytest.raises(ValueError):
        kd_loss(s, s, y, temperature=0.0, alpha=0.5)
    with pytest.raises(ValueError):
        kd_loss(s, s, y, temperature=2.0, alpha=1.5)


def test_distillation_loss_trains_the_student_and_never_the_teacher():
    torch.manual_seed(0)
    teacher = build_model({"arch": "toy", "in_channels": 1}).train()
    student = build_model({"arch": "toy", "width": 0.5, "in_channels": 1})
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    loss = distillation_loss(teacher, temperature=4.0, alpha=0.9)
    assert not teacher.training  # BN statistics of the teacher are not updated by its forward passes
    first = loss(student, x, y)
    first.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    fit(student, (x, y), (x, y), FitConfig(epochs=3, lr=0.01, batch_size=16, optimizer="adam", augment=False), loss=loss)
    assert loss(student, x, y) < first
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
