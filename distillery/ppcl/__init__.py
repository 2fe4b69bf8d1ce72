"""PPCL (Ma et al., arXiv 2511.16156): pluggable pruning with contiguous layer distillation.

The pure algorithm layer, on any block-stacked transformer described by an `Adapter`
(`adapter.trace`, `probes.fit_probes`, `cka.cka_table`, `intervals.*`, `depth.*`, `width.*`):

    trace = trace(teacher, adapter, calibration_inputs)              # every hidden state h_0..h_L
    probes, errors = fit_probes(trace, adapter)                      # 1. residual linear probes
    table = cka_table(teacher, adapter, probes, trace)               # 2. cka(u, k)
    chosen = select_intervals(pcl_candidates(table), L, ratio=0.5)   #    disjoint intervals (u, v)
    students = {iv: distill_interval(teacher, adapter, trace, iv)[0] for iv in chosen}  # 3. independent
    variant = assemble(teacher, adapter, students)                   #    any subset, no training
    variant, report = linearize_mlps(variant, adapter, trace_of_variant, targets)      # 4. width

An interval (u, v) is the slice blocks[u:v]: it maps hidden state h_u to h_v. This package's
`__init__` imports nothing, so that a stage depends on exactly the modules it uses.
"""
