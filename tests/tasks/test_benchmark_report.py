"""The PQD report's verdict against the peers and its rows for peers that produced no model."""
import pandas as pd

from tasks.benchmark import table, verdict


def frame(ours_ms: float, peer_ms: float, ours_acc: float = 98.0, peer_acc: float = 98.0) -> pd.DataFrame:
    return pd.DataFrame([{"model": "distilled", "kind": "ours", "accuracy_pct": ours_acc, "p50_ms_1t": ours_ms},
                         {"model": "ort_u8s8", "kind": "peer", "accuracy_pct": peer_acc, "p50_ms_1t": peer_ms}])


def test_the_verdict_says_win_tie_or_loss_with_the_figures():
    assert "at least as fast" in verdict(frame(0.49, 0.50), 100)[0]
    tie = verdict(frame(0.505, 0.50), 100)[0]
    assert "slower by 1.0 %" in tie and "a tie" in tie
    assert verdict(frame(0.60, 0.50), 100)[0].endswith("SLOWER.")
    assert "-2 of 100 test images: LESS accurate." in verdict(frame(0.4, 0.5, 97.0, 99.0), 100)[1]


def test_a_failed_or_switched_off_peer_is_a_row_saying_why():
    timing = {"p50_ms": 1.0, "p90_ms": 1.1, "speedup_p50": 1.0}
    result = {"models": {"teacher": {"size_bytes": 1024, "params": 10, "nonzero_params": 10, "macs": 1e6,
                                     "threads_1": timing, "batch32_threads_1": {"images_per_s": 500.0}}}}
    peers = {"nncf": {"status": "failed", "error": "ValueError: no calibration data", "label": "NNCF", "package": "nncf",
                      "version": "3.4.0"},
             "olive": {"status": "off"}}
    df = table(result, {"teacher": {"accuracy": 0.98}}, peers).set_index("model")
    assert df.loc["nncf", "note"] == "failed: ValueError: no calibration data" and df.loc["nncf", "kind"] == "peer"
    assert df.loc["olive", "note"] == "off (baselines.peers)" and pd.isna(df.loc["olive", "p50_ms_1t"])
    assert df.loc["teacher", "img_s_b32_1t"] == 500.0 and df.loc["teacher", "p90_ms_1t"] == 1.1
