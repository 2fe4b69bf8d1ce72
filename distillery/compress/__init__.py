"""Compression algorithms on any nn.Module: no params file, no tracking, no project paths.

- `pruning`: unstructured magnitude pruning with fixed masks; channel pruning (Torch-Pruning)
  with checkpoints that reload under `weights_only=True`; `prune` + `finetune_pruned` (the P step).
- `qat`: BatchNorm folding, INT8 fake-quant, `quantize_aware_train` (the Q step), the INT8 ONNX export.
- `kd`: the knowledge-distillation loss and `distill` (the D step).
- `chain`: P, Q and D in any order (`run_order`): the PQD recipe written once.
- `ptq`: ONNX Runtime's static quantization, as baselines.
- `checkpoint`: `load_compressed`, rebuilding pruned or quantized models from their checkpoints.

Functions that write (the ONNX exports, PTQ) take the output path and write it atomically.
"""
