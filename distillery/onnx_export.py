"""ONNX export and ONNX Runtime inference, with the checks that make a bad file a clear error."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from distillery.core.artifacts import atomic_path
from distillery.core.errors import ArtifactError


@contextlib.contextmanager
def quiet_export():
    """The dynamo exporter prints pages of progress; keep the stage logs readable."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(level)


BATCH_AXES = {"input": {0: "batch"}, "output": {0: "batch"}}  # a deployable takes any batch size


def _fixed_batch(model: torch.nn.Module, example: torch.Tensor) -> str | None:
    """Why the model cannot take a batch of 3 built from `example` (None when it can)."""
    try:
        with torch.no_grad():
            out = model(torch.cat([example, example, example]))
    except Exception as err:  # the model's own code refuses the batch: any exception type
        return " ".join(str(err).split())[:160] or type(err).__name__
    first = out[0] if isinstance(out, (tuple, list)) else out
    return None if first.shape[0] == 3 * example.shape[0] else f"a batch of {3 * example.shape[0]} gives {first.shape[0]} rows"


def export_program(model: torch.nn.Module, example_inputs: tuple, opset: int, **kwargs):
    """The dynamo exporter's ONNX program with a symbolic batch dimension ("batch"), or, for a model whose
    code fixes its batch (``x.view(1, -1)``, say), with the example's batch and a note saying so."""
    common = dict(dynamo=True, opset_version=opset, input_names=["input"], output_names=["output"], **kwargs)
    reason = _fixed_batch(model, example_inputs[0])
    if reason is None:
        try:
            with quiet_export():
                return torch.onnx.export(model, example_inputs, dynamic_axes=BATCH_AXES, **common)
        except Exception as err:  # torch.export raises many types; the static export below says if it is the model
            reason = " ".join(str(err).split())[-160:] or type(err).__name__
    print(f"export: the model does not take any batch ({reason}); its ONNX takes batches of "
          f"{example_inputs[0].shape[0]} only")
    with quiet_export():
        return torch.onnx.export(model, example_inputs, **common)


def check_batches(path: Path | str, run_torch, example: torch.Tensor, atol: float, rtol: float) -> float:
    """Largest |ORT - torch| over the example and, where the ONNX batch is symbolic, a batch of 3 from it."""
    sess = load_session(path, 1)
    batches = [example]
    if not isinstance(sess.get_inputs()[0].shape[0], int):
        batches.append(torch.cat([example, example * 0.5, -example]))  # batch 3: no size-1 shortcut
    worst = 0.0
    for x in batches:
        with torch.no_grad():
            expected = run_torch(x).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        if got.shape != expected.shape:
            raise ArtifactError(f"{path}: ONNX output shape {got.shape} for input {tuple(x.shape)}; torch gives "
                                f"{expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max() / (atol + rtol * np.abs(expected).max())))
    return worst


def export_fp32_onnx(model: torch.nn.Module, example_inputs: tuple, path: Path | str, opset: int = 18,
                     atol: float = 1e-3) -> Path:
    """Export with the dynamo exporter (symbolic batch), check ORT against torch, then move into place."""
    model = model.eval()
    with atomic_path(path) as tmp:
        export_program(model, example_inputs, opset).save(str(tmp), external_data=False)
        err = check_batches(tmp, model, example_inputs[0], atol, 1e-3)
        if err > 1:
            raise ArtifactError(f"{path}: ONNX output differs from torch by {err:.2f}x the tolerance "
                                f"(atol {atol}, rtol 1e-3)")
    return Path(path)


def load_session(path: Path | str, threads: int = 0):
    """An ORT session, or a clear error for a missing, truncated or corrupt model file."""
    from distillery.latency import session
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: ONNX model missing; run the export stage (dvc repro export)")
    try:
        return session(path, threads)
    except Exception as err:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise ArtifactError(f"{path}: not a loadable ONNX model, truncated or corrupt ({str(err).splitlines()[0][:200]}); "
                            "restore it with `dvc checkout` or re-run the export stage") from None


def run_onnx(path_or_session, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Model outputs for `x`, batched; accepts a path or an existing session."""
    sess = load_session(path_or_session) if isinstance(path_or_session, (str, Path)) else path_or_session
    name = sess.get_inputs()[0].name
    batch_dim = sess.get_inputs()[0].shape[0]
    step = batch_size if not isinstance(batch_dim, int) else batch_dim
    return np.concatenate([sess.run(None, {name: x[i:i + step]})[0] for i in range(0, len(x), step)])


def onnx_stats(path: Path | str) -> dict:
    """Size on disk, parameters, non-zero parameters and MACs (batch 1; a symbolic dimension counts as 1) of an
    ONNX model, and the INT8 share.

    Parameters are the weight initialisers (Q/DQ scales and zero points and int64 shape
    constants excluded), counted through DequantizeLinear so INT8 and FP32 models compare.
    `int8_macs` are those of the Conv / Gemm / MatMul nodes whose two inputs (activation and weight)
    both come straight from a DequantizeLinear of INT8 or UINT8 data, the QDQ pattern ONNX Runtime
    runs as an integer kernel; every other MAC (attention's activation-by-activation MatMuls, say,
    or a layer left in float) is FP32. `int8_mac_share` = int8_macs / macs.
    """
    import onnx
    from onnx import numpy_helper, shape_inference
    path = Path(path)
    model = onnx.load(str(path))
    graph = shape_inference.infer_shapes(model).graph
    inits = {i.name: i for i in graph.initializer}
    quant_params = {n.input[k] for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                    for k in (1, 2) if len(n.input) > k}
    params = nonzero = 0
    for name, init in inits.items():
        if name in quant_params or init.data_type == onnx.TensorProto.INT64:
            continue
        arr = numpy_helper.to_array(init)
        params += arr.size
        nonzero += int(np.count_nonzero(arr))
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else 1 for d in v.type.tensor_type.shape.dim]
              for v in list(graph.value_info) + list(graph.output) + list(graph.input)}
    for name, init in inits.items():
        shapes[name] = list(init.dims)
    dq_source = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    dtypes = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input)}
    dtypes.update({name: init.data_type for name, init in inits.items()})
    eight_bit = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}

    def shape(name: str) -> list[int]:
        return shapes.get(name) or shapes.get(dq_source.get(name, ""), [])

    def integer(node) -> bool:
        return all(dtypes.get(dq_source.get(name, "")) in eight_bit for name in node.input[:2])

    macs = int8_macs = 0
    for n in graph.node:
        node_macs = 0
        if n.op_type == "Conv":
            w, out = shape(n.input[1]), shape(n.output[0])
            if w and out:
                node_macs = int(np.prod(out)) * int(np.prod(w[1:]))
        elif n.op_type in ("Gemm", "MatMul"):
            a, out = shape(n.input[0]), shape(n.output[0])
            if a and out:
                node_macs = int(np.prod(out)) * a[-1]
        macs += node_macs
        int8_macs += node_macs if node_macs and integer(n) else 0
    return {"size_bytes": path.stat().st_size, "params": int(params), "nonzero_params": int(nonzero), "macs": int(macs),
            "int8_macs": int(int8_macs), "int8_mac_share": int8_macs / macs if macs else 0.0}


def onnx_accuracy(path: Path | str, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of an ONNX classifier on (x, y), through ONNX Runtime."""
    return float((run_onnx(path, x, batch_size).argmax(1) == y).mean())


def pool_as_global_average(path: Path | str) -> int:
    """Rewrite, in place, each ReduceMean over the two spatial axes of an NCHW tensor (keepdims) as the
    equivalent GlobalAveragePool; returns how many.

    torch's `x.mean((2, 3), keepdim=True)` and `adaptive_avg_pool2d(x, 1)` export as ReduceMean, which ONNX
    Runtime runs in FP32 between a DequantizeLinear and a QuantizeLinear; GlobalAveragePool between the same
    pair it fuses into one QLinearGlobalAveragePool kernel, so an INT8 model's pooling stays in INT8.
    """
    import onnx
    from onnx import helper, numpy_helper, shape_inference
    model = onnx.load(str(path))
    graph = model.graph
    inferred = shape_inference.infer_shapes(model).graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in list(inferred.value_info) + list(inferred.input)}
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    rewritten = 0
    for index, node in enumerate(list(graph.node)):
        if node.op_type != "ReduceMean" or len(node.input) != 2 or node.input[1] not in consts:
            continue
        keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        rank = ranks.get(node.input[0])
        if keepdims != 1 or rank != 4 or sorted(int(a) % 4 for a in consts[node.input[1]].ravel()) != [2, 3]:
            continue
        graph.node.remove(node)
        graph.node.insert(index, helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output),
                                                  name=f"{node.name}_global_pool"))
        rewritten += 1
    if rewritten:
        onnx.save(model, str(path))
    return rewritten
