import copy

import pytest
import torch

from distillery.models import build_model
from distillery.ppcl.adapter import spec_of, trace
from distillery.ppcl.depth import (DistillConfig, assemble, distill_interval, distill_sequential, load_student,
                              middle_block)

CFG = DistillConfig(steps=20, lr=3e-3, batch_size=32)


def test_a_student_learns_its_interval(model_and_inputs):
    model, adapter, inputs = model_and_inputs
    tr = trace(model, adapter, inputs)
    student, hist = distill_interval(model, adapter, tr, (1, 3), CFG)
    assert hist.final < 0.7 * hist.initial and len(hist.losses) == 20
    assert type(student) is type(adapter.blocks(model)[0]) and student is not adapter.blocks(model)[1]


def test_assembling_students_trained_apart_needs_no_training(model_and_inputs):
    model, adapter, inputs = model_and_inputs
    tr = trace(model, adapter, inputs)
    a, _ = distill_interval(model, adapter, tr, (0, 2), CFG)
    b, _ = distill_interval(model, adapter, tr, (2, 4), CFG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    variants = {"a": assemble(model, adapter, {(0, 2): a}), "b": assemble(model, adapter, {(2, 4): b}),
                "ab": assemble(model, adapter, {(0, 2): a, (2, 4): b}), "drop": assemble(model, adapter, {(1, 3): None})}
    assert {k: len(adapter.blocks(v)) for k, v in variants.items()} == {"a": 3, "b": 3, "ab": 2, "drop": 2}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # teacher untouched
    assert len(adapter.blocks(model)) == 4
    with torch.no_grad():
        ref = model(*inputs)
        outs = {k: v(*inputs) for k, v in variants.items()}
        for v in variants.values():  # students are copies: the variants do not share weights with the teacher
            assert all(p.data_ptr() != q.data_ptr() for p, q in zip(v.parameters(), model.parameters()))
    assert all(o.shape == ref.shape and not torch.allclose(o, ref) for o in outs.values())
    # a student that is the replaced block itself gives the teacher back exactly
    same = assemble(model, adapter, {(1, 2): copy.deepcopy(adapter.blocks(model)[1])})
    with torch.no_grad():
        assert torch.allclose(same(*inputs), ref, atol=1e-6)


def test_students_round_trip_through_state_dicts(mmdit):
    from distillery.ppcl.adapter import MMDIT
    inputs = mmdit.example_inputs(16)
    tr = trace(mmdit, MMDIT, inputs)
    student, _ = distill_interval(mmdit, MMDIT, tr, (1, 4), DistillConfig(steps=5, batch_size=8))
    saved = {k: v.clone() for k, v in student.state_dict().items()}
    variant = assemble(mmdit, MMDIT, {(1, 4): load_student(mmdit, MMDIT, (1, 4), saved)})
    spec = spec_of(variant, MMDIT, {"arch": "mmdit", "width": 0.5, "depth": 4, "heads": 2})
    rebuilt = build_model(spec)
    rebuilt.load_state_dict(variant.state_dict())
    with torch.no_grad():
        assert spec["depth"] == 2 and torch.allclose(rebuilt.eval()(*inputs), variant(*inputs))


def test_assemble_rejects_overlaps_and_out_of_range(mmdit):
    from distillery.ppcl.adapter import MMDIT
    blk = middle_block(mmdit, MMDIT, (0, 2))
    with pytest.raises(ValueError, match="overlap"):
        assemble(mmdit, MMDIT, {(0, 2): blk, (1, 3): blk})
    with pytest.raises(ValueError, match="outside"):
        assemble(mmdit, MMDIT, {(3, 5): blk})


def test_sequential_first_student_matches_the_pluggable_one(model_and_inputs):
    model, adapter, inputs = model_and_inputs
    tr = trace(model, adapter, inputs)
    seq = distill_sequential(model, adapter, tr, [(2, 4), (0, 2)], CFG)
    assert sorted(seq) == [(0, 2), (2, 4)]
    alone, _ = distill_interval(model, adapter, tr, (0, 2), CFG)  # the first one sees teacher inputs either way
    assert all(torch.allclose(p, q) for p, q in zip(seq[(0, 2)][0].parameters(), alone.parameters()))
    pluggable, _ = distill_interval(model, adapter, tr, (2, 4), CFG)  # the second one does not
    assert not all(torch.allclose(p, q) for p, q in zip(seq[(2, 4)][0].parameters(), pluggable.parameters()))
