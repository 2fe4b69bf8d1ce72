"""A user's own network and weights: factory references, state_dict files, the one-batch check."""
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from distillery.core.errors import ParamsError
from distillery.models import build_model, build_teacher, check_classifier, model_spec
from distillery.models import factory

USER_NET = Path(__file__).resolve().parents[1] / "flows" / "user_net.py"


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "nets").mkdir()
    shutil.copy(USER_NET, tmp_path / "nets" / "net.py")
    (tmp_path / "nets" / "blocks.py").write_text("import torch.nn as nn\n\ndef head(n):\n    return nn.Linear(4, n)\n")
    (tmp_path / "nets" / "withhead.py").write_text(
        "import torch.nn as nn\nfrom blocks import head\n\n"
        "def build(num_classes=3):\n    return nn.Sequential(nn.Flatten(), nn.Linear(16, 4), head(num_classes))\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_file_factory_builds_the_users_class_and_its_sibling_imports(project):
    model = build_model({"factory": "nets/withhead.py:build", "kwargs": {"num_classes": 5}})
    assert model(torch.zeros(2, 1, 4, 4)).shape == (2, 5)
    assert factory.source_files("nets/withhead.py:build", project) == [Path("nets/blocks.py"), Path("nets/withhead.py")]
    assert not list(project.rglob("__pycache__")), "importing the user's file wrote bytecode into their folders"


def test_a_class_is_a_factory_and_a_package_module_resolves(project):
    assert isinstance(build_model({"factory": "nets/net.py:Net", "kwargs": {}}), nn.Module)
    assert isinstance(build_model({"factory": "torch.nn:Linear", "kwargs": {"in_features": 3, "out_features": 2}}), nn.Linear)
    assert factory.source_files("torch.nn:Linear", project) == []  # installed, outside the project: pinned, not a dep


@pytest.mark.parametrize("ref, needle", [
    ("nets/missing.py:build", "file nets/missing.py not found"),
    ("nets/net.py:biuld", "did you mean build"),
    ("no_such_package_xyz.mod:f", "cannot import no_such_package_xyz.mod"),
    ("nets/net.py:not_a_model", "returned a dict, not a torch.nn.Module"),
    ("nonsense", "not a factory reference"),
])
def test_bad_factory_references_are_one_clear_error(project, ref, needle):
    with pytest.raises(ParamsError, match=needle.replace(".", r"\.")):
        factory.build(ref, {})


def test_an_import_error_in_the_users_file_names_the_file(project):
    (project / "nets" / "broken.py").write_text("import not_installed_module_xyz\n")
    with pytest.raises(ParamsError, match=r"importing .*broken\.py failed: ModuleNotFoundError"):
        factory.build("nets/broken.py:build", {})


def test_state_dicts_load_from_usual_containers(project, tmp_path):
    net = factory.build("nets/net.py:build", {})
    state = net.state_dict()
    torch.save({"epoch": 3, "model_state_dict": state}, tmp_path / "ckpt.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "dp.pt")  # saved from DataParallel
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "w.safetensors"))
    for name in ("ckpt.pth", "dp.pt", "w.safetensors"):
        fresh = factory.build("nets/net.py:build", {})
        factory.load_user_weights(fresh, tmp_path / name)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items()), name


def test_weights_that_do_not_fit_name_the_first_offending_keys(project, tmp_path):
    other = factory.build("nets/net.py:build", {"num_classes": 4})
    torch.save(other.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ParamsError, match=r"w\.pt.*2 shape mismatch\(es\) \['fc2\.weight \(4, 32\) vs \(10, 32\)'"):
        factory.load_user_weights(factory.build("nets/net.py:build", {}), tmp_path / "w.pt")
    torch.save({"model": other, "state_dict": other.state_dict()}, tmp_path / "pickled.pt")
    with pytest.raises(ParamsError, match="unsafe unpickling"):
        factory.load_user_weights(factory.build("nets/net.py:build", {}), tmp_path / "pickled.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ParamsError, match="not a readable torch file"):
        factory.read_state_dict(tmp_path / "garbage.pt")


def test_zoo_spec_takes_the_datas_shape_and_the_one_batch_check_compares_classes():
    spec = model_spec("toy", {"width": 0.5}, in_channels=3, num_classes=7, image_size=8)
    assert spec == {"arch": "toy", "in_channels": 3, "num_classes": 7, "width": 0.5}
    model = build_teacher(spec)
    check_classifier(model, torch.zeros(2, 3, 8, 8), 7)
    with pytest.raises(ParamsError, match=r"outputs shape \(2, 7\) for 2 images, but the data has 4 classes \(a, b"):
        check_classifier(model, torch.zeros(2, 3, 8, 8), 4, ["a", "b", "c", "d"])
    with pytest.raises(ParamsError, match=r"fails on a batch of the prepared images, shape \(2, 1, 8, 8\)"):
        check_classifier(model, torch.zeros(2, 1, 8, 8), 7)
    with pytest.raises(ParamsError, match="widht"):
        build_teacher(model_spec("toy", {"widht": 2}, 1, 2, 8))
    with pytest.raises(ParamsError, match="not a zoo model"):
        model_spec("resnet1000", {}, 1, 2, 8)
    assert "nets" not in sys.modules


@pytest.mark.parametrize("ref, kwargs", [
    ("timm:create_model", {"model_name": "resnet10t", "num_classes": 3}),
    ("torchvision.models:mobilenet_v3_small", {"num_classes": 3}),
])
def test_the_maintained_zoos_build_through_a_factory_reference(ref, kwargs):
    import importlib.util
    if importlib.util.find_spec(ref.split(":")[0].split(".")[0]) is None:
        pytest.skip("the dev extras hold timm and torchvision")
    model = build_teacher(model_spec(ref, kwargs, 3, 3, 32))
    check_classifier(model, torch.zeros(2, 3, 32, 32), 3)


def test_source_files_follow_python_and_leave_installed_packages_and_outside_files_right(project, tmp_path_factory):
    (project / "nets" / "layers").mkdir()
    (project / "nets" / "layers" / "__init__.py").write_text("")
    (project / "nets" / "layers" / "blocks.py").write_text("import helpers\n")
    (project / "nets" / "helpers.py").write_text("")  # found on the factory file's folder, as Python finds it
    (project / "nets" / "deep.py").write_text("from layers.blocks import B\n")
    assert factory.source_files("nets/deep.py:build", project) == [
        Path("nets/deep.py"), Path("nets/helpers.py"), Path("nets/layers/__init__.py"), Path("nets/layers/blocks.py")]
    outside = tmp_path_factory.mktemp("course") / "net.py"
    shutil.copy(USER_NET, outside)
    assert factory.source_files(f"{outside}:build", project) == [outside.resolve()]  # tracked by its absolute path
    assert factory.source_files("torch.nn:Linear", Path(torch.__file__).parents[2]) == []  # installed, even inside root


def test_a_broken_package_module_and_numpy_scalars_in_a_checkpoint(project, tmp_path, monkeypatch):
    (project / "mypkg").mkdir()
    (project / "mypkg" / "__init__.py").write_text("")
    (project / "mypkg" / "bad.py").write_text("def build(:\n")
    monkeypatch.syspath_prepend(str(project))
    with pytest.raises(ParamsError, match=r"importing mypkg\.bad failed: SyntaxError"):
        factory.build("mypkg.bad:build", {})
    import numpy as np
    net = factory.build("nets/net.py:build", {})
    torch.save({"state_dict": net.state_dict(), "best_acc": np.float64(0.97), "epoch": np.int64(3)}, tmp_path / "c.pt")
    factory.load_user_weights(factory.build("nets/net.py:build", {}), tmp_path / "c.pt")


@pytest.mark.parametrize("model, kwargs, needle", [
    ("toy", {"width": 0}, "width = 0: the zoo's width must be a number in (0, 16]"),
    ("resnet18", {"depth": 0}, "depth = 0: the zoo's depth must be a number in [1, 64]"),
    ("wrn28_10", {"depth": 20}, "WRN depth must be 6n"),
])
def test_zoo_kwargs_out_of_range_are_one_clear_error(model, kwargs, needle):
    with pytest.raises(ParamsError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        build_teacher(model_spec(model, kwargs, 3, 10, 16))
