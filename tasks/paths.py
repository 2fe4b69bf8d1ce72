"""Where every artifact of the project lives, relative to the project root: the one place a path is named.

`dvc.yaml` names the same files as each stage's deps and outs (DVC needs them there);
`tests/tasks/test_paths.py` checks that every path here is one that dvc.yaml names. Stages, flows and benchmarks import
from here; the library (`distillery`) takes paths as arguments and knows none of these.
"""
from pathlib import Path

PREPARED = Path("data/prepared")  # train/val/test .npz + meta.json (stage prepare)
TEACHER = Path("models/teacher.pt")  # the FP32 teacher (stage train)
TRAIN_CURVE = Path("plots/train.csv")  # its per-epoch curve (DVC plots)

PRUNED = Path("models/pqd/pruned.pt")
QUANTIZED = Path("models/pqd/quantized.pt")
DISTILLED = Path("models/pqd/distilled.pt")
CHECKPOINTS = {"teacher": TEACHER, "pruned": PRUNED, "quantized": QUANTIZED, "distilled": DISTILLED}
DEPLOYED = {  # step of the PQD recipe -> its deployed ONNX file (stage export), in the recipe's order
    "teacher": Path("models/teacher.fp32.onnx"),
    "pruned": Path("models/pqd/pruned.fp32.onnx"),
    "quantized": Path("models/pqd/quantized.int8.onnx"),
    "distilled": Path("models/pqd/student.int8.onnx"),
}
COUNTERPART = Path("models/pqd/counterpart")  # <method>.int8.onnx: P->Q->D with the other prune.method (stage counterpart)
BASELINES = Path("models/baselines")  # <peer>.int8.onnx: the teacher quantized by each PTQ peer (stage baselines)
PQD_REPORT = Path("reports/pqd")  # .md and .csv
PQD_TRADEOFF = Path("reports/pqd_tradeoff.png")  # accuracy against latency

ABLATION = Path("models/ablation")  # <order>/seed<k>.int8.onnx
ABLATION_METRICS = Path("metrics/ablation")  # <order>.json
ABLATION_TEACHER_ONNX = Path("models/ablation_teacher.fp32.onnx")
ABLATION_REPORT = Path("reports/ablation")  # .md, .csv, .png

PPCL = Path("models/ppcl")
PPCL_TEACHER = PPCL / "teacher"  # source.json (+ the model trained here)
PPCL_INPUTS = PPCL / "inputs.pt"  # calibration and held-out inputs of the teacher
PROBES = PPCL / "probes.pt"
STUDENTS = PPCL / "students"
SEQUENTIAL = PPCL / "sequential"
WIDTH = PPCL / "width"  # a save_pretrained folder
VARIANTS = PPCL / "variants"  # the menu as save_pretrained folders
PPCL_ONNX = PPCL / "onnx"
INTERVALS = Path("reports/ppcl_intervals.json")
CKA_PLOT = Path("reports/ppcl_cka.png")
PPCL_REPORTS = Path("reports/ppcl")
MENU_REPORT = Path("reports/ppcl_menu")  # .md, .csv, .png

METRICS = Path("metrics")  # <stage>.json


def metrics(stage: str) -> Path:
    """The metrics file of a stage (DVC metrics, cache: false)."""
    return METRICS / f"{stage}.json"


def baseline_model(peer: str) -> Path:
    return BASELINES / f"{peer}.int8.onnx"


def counterpart_model(method: str) -> Path:
    return COUNTERPART / f"{method}.int8.onnx"


def compared_models() -> dict[str, Path]:
    """Every model the PQD report compares, name -> ONNX: the recipe's steps, then the P->Q->D student with the
    other pruning method (`distilled_<method>`), then each peer that produced a model (`<peer>`), as found on disk."""
    models = dict(DEPLOYED)
    models |= {f"distilled_{p.name.split('.')[0]}": p for p in sorted(COUNTERPART.glob("*.int8.onnx"))}
    return models | {p.name.split(".")[0]: p for p in sorted(BASELINES.glob("*.int8.onnx"))}


def ablation_model(order: str, seed: int) -> Path:
    return ABLATION / order / f"seed{seed}.int8.onnx"
