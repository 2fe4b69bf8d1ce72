import numpy as np
import onnxruntime as ort
import torch

from distillery.ppcl.adapter import MMDIT, trace
from distillery.ppcl.depth import DistillConfig, assemble, distill_interval
from distillery.ppcl.export import PackedStep, export_step, feeds, pack_inputs


def session(proto):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def test_an_assembled_variant_exports_as_one_step_matching_torch(mmdit):
    inputs = mmdit.example_inputs(16)
    tr = trace(mmdit, MMDIT, inputs)
    student, _ = distill_interval(mmdit, MMDIT, tr, (1, 3), DistillConfig(steps=3, batch_size=8))
    variant = assemble(mmdit, MMDIT, {(1, 3): student})
    proto = export_step(variant, mmdit.example_inputs(1))
    assert [i.name for i in proto.graph.input] == ["x", "t", "tokens"]
    assert [o.name for o in proto.graph.output] == ["velocity"]
    sess = session(proto)
    x, t, tokens = mmdit.example_inputs(3)  # another batch size than the export example
    (out,) = sess.run(None, feeds(x, t, tokens))
    with torch.no_grad():
        ref = variant(x, t, tokens).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_packed_step_is_the_same_step_behind_one_input(mmdit):
    # PackedStep exists for distillery.latency.time_models, which feeds a single input
    x, t, tokens = mmdit.example_inputs(3)
    with torch.no_grad():
        assert torch.equal(PackedStep(mmdit)(pack_inputs(x, t, tokens)), mmdit(x, t, tokens))
