import numpy as np
import torch

from distillery.models import build_model
from distillery.models.mmdit import Mlp, ResidualLinear
from distillery.ppcl.adapter import spec_of, trace
from distillery.ppcl.width import WidthConfig, linearize_mlps, lowest_error_targets, mlp_io, mlp_linear_errors


def test_mlp_errors_rank_and_targets(model_and_inputs):
    model, adapter, inputs = model_and_inputs
    tr = trace(model, adapter, inputs)
    errors = mlp_linear_errors(model, adapter, tr)
    assert errors.shape == (4, len(adapter.streams)) and np.all(errors > 0)
    targets = lowest_error_targets(errors, 2)
    assert len(targets) == 2 and max(errors[t] for t in targets) <= np.sort(errors, axis=None)[1]
    assert all(s == 0 for _, s in lowest_error_targets(errors, 3, stream=0))


def test_a_linear_mlp_is_recovered_exactly(vit):
    from distillery.ppcl.adapter import VIT
    # a block whose MLP is already linear (GELU replaced by identity) is fitted with no error
    block = vit.blocks[1]
    block.mlp[1] = torch.nn.Identity()
    tr = trace(vit, VIT, (torch.randn(64, 1, 8, 8),))
    errors = mlp_linear_errors(vit, VIT, tr, ridge=0.0)
    assert errors[1, 0] < 1e-8 and errors[0, 0] > 1e-4


def test_linearize_trains_only_the_projectors_and_rebuilds_from_spec(mmdit):
    from distillery.ppcl.adapter import MMDIT
    inputs = mmdit.example_inputs(48)
    tr = trace(mmdit, MMDIT, inputs)
    frozen = {k: v.clone() for k, v in mmdit.state_dict().items()}
    targets = [(0, 1), (2, 0), (2, 1)]  # text MLP of block 0, both MLPs of block 2
    # a heavy ridge makes a poor init (W ~ 0), so that training has something to do
    pruned, report = linearize_mlps(mmdit, MMDIT, tr, targets, WidthConfig(ridge=1e3, steps=30, lr=3e-3, batch_size=16))
    assert all(torch.equal(frozen[k], v) for k, v in mmdit.state_dict().items())  # the input model is unchanged
    blocks = MMDIT.blocks(pruned)
    assert isinstance(blocks[0].mlp_txt, ResidualLinear) and isinstance(blocks[0].mlp_img, Mlp)
    assert isinstance(blocks[2].mlp_img, ResidualLinear) and isinstance(blocks[2].mlp_txt, ResidualLinear)
    for name, p in blocks[2].named_parameters():  # attention and modulation kept as they were
        if not name.startswith("mlp"):
            assert torch.equal(p, MMDIT.blocks(mmdit)[2].get_parameter(name))
    assert [(r["block"], r["stream"]) for r in report] == [(0, "txt"), (2, "img"), (2, "txt")]
    assert all(r["loss_trained"] < 0.9 * r["loss_init"] for r in report)
    assert all(r["error_trained"] < r["error_init"] for r in report)
    spec = spec_of(pruned, MMDIT, {"arch": "mmdit", "width": 0.5, "depth": 4, "heads": 2})
    assert spec["linear_mlp_img"] == [2] and spec["linear_mlp_txt"] == [0, 2]
    rebuilt = build_model(spec)
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(*inputs), pruned(*inputs))
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in mmdit.parameters())


def test_mlp_io_captures_the_mlp(mmdit):
    from distillery.ppcl.adapter import MMDIT
    tr = trace(mmdit, MMDIT, mmdit.example_inputs(4))
    x, y = mlp_io(MMDIT.blocks(mmdit)[1], MMDIT, 0, tr.hidden[1], tr.cond)
    assert x.shape == tr.hidden[1][0].shape and torch.allclose(MMDIT.blocks(mmdit)[1].mlp_img(x), y)
