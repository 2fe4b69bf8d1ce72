"""The ablation's params (per-order overrides) and its report stage's table and plot."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from distillery.core.errors import ParamsError
from distillery.core.params import parse_section

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "params.yaml").read_text())["ablation"]


def test_orders_overrides_are_validated_and_applied():
    cfg = parse_section("ablation", {**BASE, "kd_epochs": 3, "orders": {"pqd": {"kd_epochs": 5}, "qpd": {}}})
    assert cfg.for_order("pqd").kd_epochs == 5 and cfg.for_order("qpd").kd_epochs == 3
    with pytest.raises(ParamsError, match="unknown order 'pxd'"):
        parse_section("ablation", {**BASE, "orders": {"pxd": {}}})
    with pytest.raises(ParamsError, match="unknown override"):
        parse_section("ablation", {**BASE, "orders": {"pqd": {"temprature": 2.0}}})
    with pytest.raises(ParamsError, match="no order 'dqp'"):
        cfg.for_order("dqp")
    with pytest.raises(ParamsError, match="orders.pqd: kd_epochs = -1"):
        parse_section("ablation", {**BASE, "orders": {"pqd": {"kd_epochs": -1}}})


def test_report_summarises_seeds_per_order_and_plots_every_seed(tmp_path):
    import pandas as pd
    from tasks.ablation_report import markdown, plot, summarise
    accs = {"pqd": [0.98, 0.99], "qdp": [0.99, 0.88], "dpq": [0.97, 0.97]}
    runs = pd.DataFrame([{"order": o, "seed": s, "test_acc": a, "size_bytes": 2048, "p50_ms": 0.5 + s / 10,
                          "p90_ms": 0.7, "mean_ms": 0.6, "speedup_p50": 3.0} for o, seeds in accs.items()
                         for s, a in enumerate(seeds)])
    teacher = {"test_acc": 0.985, "p50_ms": 1.5, "size_bytes": 8192}
    table = summarise(runs, teacher)
    assert table["order"].tolist() == ["pqd", "qdp", "dpq"]  # the params' order, not alphabetical
    row = table.set_index("order").loc["qdp"]
    assert row["acc_mean_pct"] == pytest.approx(93.5)
    assert row["acc_std_pct"] == pytest.approx(100 * np.std([0.99, 0.88], ddof=1))
    assert row["p50_ms_1t"] == pytest.approx(0.55) and row["speedup_vs_fp32"] == pytest.approx(1.5 / 0.55)
    assert "| QDP     | 93.50 ± 7.78" in markdown(table, teacher, {"onnxruntime_version": "x", "cpu_model": "cpu",
                                                               "cpu_cores": 2, "avx512_vnni": True, "amx_int8": False})
    plot(table, runs, teacher, tmp_path / "ablation.png")
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
