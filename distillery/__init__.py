"""Distillery: compress PyTorch models for CPU deployment and prove it by measurement.

The library, importable from a notebook on anyone's model; it knows nothing of params.yaml,
MLflow, Prefect or DVC (`distillery.core` holds the plumbing the pipeline's stages share):

- `distillery.compress`: pruning, INT8 QAT and its ONNX export, knowledge distillation, ONNX
  Runtime PTQ, and `chain`, the prune / quantize / distill composition in any order.
- `distillery.ppcl`: PPCL's probes, CKA, contiguous intervals, pluggable students, width projectors.
- `distillery.models`, `distillery.data`, `distillery.training`, `distillery.onnx_export`,
  `distillery.latency`: the model zoo, data loaders, the training loop, export and CPU timing.

Package `__init__` files import nothing (but `models/__init__`, which registers the zoo): a module's
imports are exactly what it uses, so the pipeline's code dependencies (dvc.yaml) stay exact and small.
"""
__version__ = "0.2.0"
