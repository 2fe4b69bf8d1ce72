"""tasks/paths.py names each project path once; every one of them is a path that dvc.yaml declares."""
from pathlib import Path

import yaml

import tasks.paths as paths

ROOT = Path(__file__).resolve().parents[2]


def declared() -> set[str]:
    out = set()
    for st in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        body = st.get("do", st)
        for key in ("deps", "outs", "metrics", "plots"):
            for item in body.get(key, []):
                out.add(str(next(iter(item)) if isinstance(item, dict) else item))
    return out


def test_every_path_in_paths_py_is_declared_in_dvc_yaml():
    names = declared()
    constants = [v for k, v in vars(paths).items() if k.isupper()]
    values = [v for v in constants if isinstance(v, Path)]
    values += [p for v in constants if isinstance(v, dict) for p in v.values()]
    assert len(values) > 20
    values += [paths.metrics(s) for s in ("train", "prune", "quantize", "distill", "export", "evaluate", "benchmark",
                                          "ablation_report", "ppcl_teacher", "ppcl_probe", "ppcl_depth_distill",
                                          "ppcl_width", "ppcl_menu")]
    values.append(paths.ablation_model("pqd", 0).parent.parent)
    missing = [str(v) for v in values if not any(n == str(v) or n.startswith(str(v)) for n in names)]
    assert not missing, f"paths.py names paths dvc.yaml does not declare: {missing}"
