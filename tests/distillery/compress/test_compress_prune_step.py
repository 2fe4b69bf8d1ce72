import pytest
import torch

from distillery.compress.pruning import prune
from distillery.models import build_model


@pytest.mark.parametrize("method", ["unstructured", "structured"])
def test_pruning_a_teacher_frozen_for_distillation_still_prunes_and_trains(method):
    teacher = build_model({"arch": "toy", "in_channels": 1, "num_classes": 10}).requires_grad_(False)
    model, mask = prune(teacher, method, 0.5, torch.zeros(1, 1, 8, 8))
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    nonzero = lambda m: sum(int((p != 0).sum()) for p in m.parameters())  # noqa: E731
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())  # the teacher is left as it was
    if method == "structured":
        assert params(model) < 0.6 * params(teacher) and mask is None
    else:
        assert params(model) == params(teacher) and nonzero(model) < 0.6 * nonzero(teacher) and mask
