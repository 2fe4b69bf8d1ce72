import pickle

import pytest
import torch

from distillery.models import build_model
from distillery.ppcl.adapter import MMDIT, VIT, StreamwiseBlock, adapter_for, replace_blocks, spec_of, trace


def test_trace_keeps_every_hidden_state_and_the_output(model_and_inputs):
    model, adapter, inputs = model_and_inputs
    tr = trace(model, adapter, inputs, batch_size=24)  # several batches, concatenated
    assert tr.n_blocks == 4 and len(tr.hidden) == 5 and len(tr) == 64
    assert all(len(h) == len(adapter.streams) for h in tr.hidden)
    with torch.no_grad():
        assert torch.allclose(tr.output, model(*inputs), atol=1e-5)
        again = adapter.run(list(adapter.blocks(model))[2:], tr.hidden[2], tr.cond)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(again, tr.hidden[4]))
    assert not torch.allclose(tr.hidden[0][0], tr.hidden[1][0])  # blocks are not the identity


def test_streamwise_block_follows_the_calling_convention(model_and_inputs):
    model, adapter, inputs = model_and_inputs
    tr = trace(model, adapter, inputs)
    block = StreamwiseBlock([torch.nn.Identity() for _ in adapter.streams], adapter.uses_cond)
    out = adapter.call(block, tr.hidden[1], tr.cond)
    assert len(out) == len(adapter.streams) and all(torch.equal(a, b) for a, b in zip(out, tr.hidden[1]))


def test_replace_blocks_leaves_the_original_alone(model_and_inputs):
    model, adapter, inputs = model_and_inputs
    blocks = list(adapter.blocks(model))
    short = replace_blocks(model, adapter, blocks[:2])
    assert len(adapter.blocks(short)) == 2 and len(adapter.blocks(model)) == 4
    assert adapter.blocks(short)[0] is not blocks[0]
    with torch.no_grad():
        short(*inputs)


def test_adapter_lookup_pickling_and_spec(mmdit, vit):
    assert adapter_for(mmdit) is MMDIT and adapter_for(vit) is VIT
    assert pickle.loads(pickle.dumps(MMDIT)) == MMDIT  # fans out to worker processes
    with pytest.raises(TypeError):
        adapter_for(torch.nn.Linear(2, 2))
    spec = {"arch": "mmdit", "width": 0.5, "depth": 4, "heads": 2}
    short = replace_blocks(mmdit, MMDIT, list(MMDIT.blocks(mmdit))[:3])
    new_spec = spec_of(short, MMDIT, spec)
    assert new_spec["depth"] == 3 and new_spec["linear_mlp_img"] == [] and new_spec["linear_mlp_txt"] == []
    build_model(new_spec).load_state_dict(short.state_dict())
