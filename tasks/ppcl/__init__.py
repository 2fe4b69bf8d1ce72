"""PPCL (Ma et al., arXiv 2511.16156): pluggable pruning with contiguous layer distillation.

The pure algorithm layer, on any block-stacked transformer described by an `Adapter`:

    trace = trace(teacher, adapter, calibration_inputs)              # every hidden state h_0..h_L
    probes, errors = fit_probes(trace, adapter)                      # 1. residual linear probes
    table = cka_table(teacher, adapter, probes, trace)               # 2. cka(u, k)
    chosen = select_intervals(pcl_candidates(table), L, ratio=0.5)   #    disjoint intervals (u, v)
    students = {iv: distill_interval(teacher, adapter, trace, iv)[0] for iv in chosen}  # 3. independent
    variant = assemble(teacher, adapter, students)                   #    any subset, no training
    variant, report = linearize_mlps(variant, adapter, trace_of_variant, targets)      # 4. width

An interval (u, v) is the slice blocks[u:v]: it maps hidden state h_u to h_v.
"""
from tasks.ppcl.adapter import MMDIT, VIT, Adapter, StreamwiseBlock, Trace, adapter_for, spec_of, trace
from tasks.ppcl.cka import cka_table, linear_cka
from tasks.ppcl.depth import DistillConfig, assemble, distill_interval, distill_sequential, load_student
from tasks.ppcl.intervals import (Candidate, angular_candidates, bi_candidates, block_influence, contiguous_intervals,
                                  delta, pcl_candidates, select_intervals, threshold_intervals)
from tasks.ppcl.probes import ProbeConfig, fit_probes, fit_residual_linear
from tasks.ppcl.width import WidthConfig, linearize_mlps, lowest_error_targets, mlp_linear_errors

__all__ = [
    "Adapter", "MMDIT", "VIT", "StreamwiseBlock", "Trace", "adapter_for", "spec_of", "trace",
    "cka_table", "linear_cka",
    "DistillConfig", "assemble", "distill_interval", "distill_sequential", "load_student",
    "Candidate", "angular_candidates", "bi_candidates", "block_influence", "contiguous_intervals", "delta",
    "pcl_candidates", "select_intervals", "threshold_intervals",
    "ProbeConfig", "fit_probes", "fit_residual_linear",
    "WidthConfig", "linearize_mlps", "lowest_error_targets", "mlp_linear_errors",
]
