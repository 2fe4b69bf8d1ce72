"""Compression algorithms: pure functions on models, no files, no tracking.

- `pruning`: unstructured magnitude pruning with fixed masks; channel pruning (Torch-Pruning)
  with checkpoints that reload under `weights_only=True`.
- `qat`: BatchNorm folding, INT8 quantization-aware training, and the INT8 ONNX export.
- `kd`: the knowledge-distillation loss for `distillery.training.fit`.
- `ptq`: ONNX Runtime's static quantization, as baselines.
"""
