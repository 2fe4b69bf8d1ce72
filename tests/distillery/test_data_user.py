"""The user's own data: photos of any size and mode, their own test split, their own normalisation."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from distillery.core.errors import DataError, ParamsError
from distillery.core.params import parse_section
from distillery.data import (check_source, fit_image, load_data, load_digits_bundled, load_source, prepare_splits,
                             resize)

MODES = ("RGB", "L", "RGBA", "P")


def photo(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).convert(mode).save(path)


def photo_folder(root: Path, classes: tuple[str, ...], per_class: int, seed: int) -> Path:
    """A class folder per name; every image a different size and one of four modes."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            k = seed + 10 * c + i
            photo(root / name / f"{i}.png", (9 + 7 * (k % 5), 11 + 5 * (k % 3)), MODES[k % 4], k)
    return root


@pytest.fixture
def photos(tmp_path):
    """train/ with three classes, val/ with two of them: val's own labels (dog 0, emu 1) differ from train's."""
    return (photo_folder(tmp_path / "train", ("cat", "dog", "emu"), 8, 0),
            photo_folder(tmp_path / "val", ("dog", "emu"), 3, 100))


def test_photo_folder_with_its_own_test_split(photos):
    train, val = photos
    data = load_data("imagefolder", str(train), 8, False, test_path=str(val))
    assert data.classes == ["cat", "dog", "emu"] and data.test_source == "test_path"
    splits, meta = prepare_splits(*data[:3], 8, False, 0.25, 0.2, 0, normalize="none", test=data.test)
    assert {k: v[0].shape for k, v in splits.items()} == {"train": (18, 3, 8, 8), "val": (6, 3, 8, 8), "test": (6, 3, 8, 8)}
    assert splits["test"][1].tolist() == [1, 1, 1, 2, 2, 2]  # mapped by name, not by the val folder's own order
    expected = []
    for f in sorted((val / "dog").iterdir()) + sorted((val / "emu").iterdir()):
        with Image.open(f) as im:
            expected.append(fit_image(im, 8, False))
    assert np.array_equal(splits["test"][0], np.stack(expected))  # exactly the val folder, nothing carved
    assert meta["test_source"] == "test_path" and meta["counts"] == {"train": 18, "val": 6, "test": 6}
    assert 0.0 <= splits["train"][0].min() and splits["train"][0].max() <= 1.0
    gray = load_data("imagefolder", str(train), 8, True, test_path=str(val))
    assert gray.x.shape == (24, 1, 8, 8) and gray.test[0].shape == (6, 1, 8, 8)


def test_check_source_describes_what_prepare_makes(photos):
    train, val = photos
    found = check_source("imagefolder", str(train), test_path=str(val))
    assert found == {"classes": ["cat", "dog", "emu"], "num_classes": 3, "in_channels": 3, "test_source": "test_path"}
    assert check_source("imagefolder", str(train), grayscale=True)["in_channels"] == 1
    assert check_source("digits", None) == {"classes": [str(i) for i in range(10)], "num_classes": 10,
                                            "in_channels": 1, "test_source": "carved"}


def test_fit_is_resize_of_the_shorter_side_then_centre_crop(tmp_path):
    half = np.zeros((20, 40), np.uint8)
    half[:, 20:] = 200  # 40x20: shorter side 20 -> 10, so 20x10; the centre 10 columns are 5..14
    # by hand: antialiased bilinear at scale 2 weighs 4 source pixels .25 .75 .75 .25, so the two columns
    # over the edge are (0 * 1.75 + 200 * .25) / 2 = 25 and 175; a crop off by one would shift the row
    row = np.array([0, 0, 0, 0, 25, 175, 200, 200, 200, 200]) / 255
    wide = fit_image(Image.fromarray(half), 10, True)
    assert wide.shape == (1, 10, 10) and np.allclose(wide[0], row[None], atol=1e-6)
    tall = fit_image(Image.fromarray(half.T.copy()), 10, True)
    assert np.allclose(tall[0], row[:, None], atol=1e-6)
    rgb = fit_image(Image.fromarray(np.stack([half] * 3, -1)), 10, False)
    assert rgb.shape == (3, 10, 10) and np.allclose(rgb, row[None, None], atol=1e-6)
    assert np.allclose(resize(half[None, None] / np.float32(255), 10, False)[0, 0], row[None], atol=1e-6)  # arrays alike
    photo(tmp_path / "imgs/b/0.png", (30, 30), "RGB", 0)
    photo(tmp_path / "imgs/a/0.png", (40, 20), "L", 0)
    Image.fromarray(half).save(tmp_path / "imgs/a/0.png")  # the loader fits each image the same way
    x, _, _ = load_source("imagefolder", str(tmp_path / "imgs"), 10, True)
    assert np.allclose(x[0, 0], row[None], atol=1e-6)


def test_square_inputs_resize_as_before():
    x, _, _ = load_digits_bundled()
    before = F.interpolate(torch.from_numpy(x), size=(16, 16), mode="bilinear", align_corners=False, antialias=False)
    assert np.array_equal(resize(x, 16, False), before.numpy())
    assert np.array_equal(resize(x, 8, False), x)


def test_hidden_files_are_skipped_and_a_broken_image_is_named(tmp_path):
    root = photo_folder(tmp_path / "imgs", ("a", "b"), 2, 0)
    (root / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata, not an image
    assert len(load_source("imagefolder", str(root), 8, False)[0]) == 4
    check_source("imagefolder", str(root))
    (root / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    for call in (lambda: load_source("imagefolder", str(root), 8, False), lambda: check_source("imagefolder", str(root))):
        with pytest.raises(DataError, match="broken.jpg: not a readable image") as err:
            call()
        assert "\n" not in str(err.value)


def test_a_test_class_unknown_to_train_names_it_and_both_folders(photos):
    train, val = photos
    photo(val / "yak" / "0.png", (12, 12), "RGB", 0)
    for call in (lambda: load_data("imagefolder", str(train), 8, False, test_path=str(val)),
                 lambda: check_source("imagefolder", str(train), test_path=str(val))):
        with pytest.raises(DataError, match="'yak'") as err:
            call()
        assert str(train) in str(err.value) and str(val) in str(err.value)


def npz_data(tmp_path, channels_last: bool = False) -> Path:
    x = np.random.default_rng(0).random((60, 10, 10, 3) if channels_last else (60, 1, 10, 12), dtype=np.float32)
    path = tmp_path / ("rgb.npz" if channels_last else "gray.npz")
    np.savez(path, x=x, y=np.arange(60) % 3)
    return path


def test_normalize_none_dataset_and_explicit(tmp_path):
    x, y, classes = load_source("npz", str(npz_data(tmp_path)), 8, False)
    fitted = resize(x, 8, False)
    none, meta = prepare_splits(x, y, classes, 8, False, 0.15, 0.2, 0, normalize="none")
    assert meta["normalize"] == "none" and meta["mean"] == [0.0] and meta["std"] == [1.0]
    assert np.array_equal(np.sort(np.concatenate([none[k][0] for k in none]), None), np.sort(fitted, None))  # untouched
    data, meta = prepare_splits(x, y, classes, 8, False, 0.15, 0.2, 0, normalize="dataset")
    assert abs(data["train"][0].mean()) < 1e-4 and abs(data["train"][0].std() - 1) < 1e-3
    assert np.allclose(data["test"][0], (none["test"][0] - meta["mean"][0]) / meta["std"][0], atol=1e-5)
    given, meta = prepare_splits(x, y, classes, 8, False, 0.15, 0.2, 0, normalize={"mean": [0.5], "std": [0.25]})
    assert meta["normalize"] == "explicit" and meta["mean"] == [0.5] and meta["std"] == [0.25]
    assert np.allclose(given["val"][0], (none["val"][0] - 0.5) / 0.25)


def test_normalize_with_the_wrong_number_of_channels(tmp_path):
    rgb = str(npz_data(tmp_path, channels_last=True))
    three = {"mean": [0.5] * 3, "std": [0.2] * 3}
    assert check_source("npz", rgb, normalize=three)["in_channels"] == 3
    with pytest.raises(DataError, match="3 mean/std values .* 1-channel images .*grayscale = true"):
        check_source("npz", rgb, grayscale=True, normalize=three)  # grayscale makes one channel of three
    x, y, classes = load_source("npz", rgb, 8, True)
    with pytest.raises(DataError, match="3 mean and 3 std values but the images have 1 channel"):
        prepare_splits(x, y, classes, 8, True, 0.15, 0.2, 0, normalize=three)
    raw = {"source": "cifar", "path": str(tmp_path), "image_size": 8, "grayscale": True, "normalize": three,
           "val_ratio": 0.1, "test_ratio": 0.1, "seed": 0}
    with pytest.raises(ParamsError, match="3 mean/std values, but prepare.source = 'cifar' with prepare.grayscale = true"):
        parse_section("prepare", raw)
    with pytest.raises(ParamsError, match=r"prepare.normalize = .*std \[0.0, 1.0, 1.0\]: give a value > 0"):
        parse_section("prepare", {**raw, "grayscale": False, "normalize": {"mean": [0.5] * 3, "std": [0, 1, 1]}})
    assert parse_section("prepare", {**raw, "normalize": {"mean": [0.5], "std": [1]}}).normalize.std == [1.0]


def test_npz_test_path_is_the_test_split(tmp_path):
    train = npz_data(tmp_path)
    test = tmp_path / "test.npz"
    np.savez(test, x=np.ones((5, 20, 10), np.float32), y=np.array([2, 2, 1, 1, 0]))  # non-square: fitted the same way
    data = load_data("npz", str(train), 8, False, test_path=str(test))
    splits, meta = prepare_splits(*data[:3], 8, False, 0.15, 0.4, 0, normalize="none", test=data.test)
    assert splits["test"][0].shape == (5, 1, 8, 8) and np.allclose(splits["test"][0], 1.0)
    assert splits["test"][1].tolist() == [2, 2, 1, 1, 0] and meta["counts"]["test"] == 5
    assert meta["counts"]["train"] + meta["counts"]["val"] == 60  # test_ratio 0.4 ignored
    assert check_source("npz", str(train), test_path=str(test))["test_source"] == "test_path"


def test_prepare_stage_writes_the_users_splits(photos, monkeypatch, capsys):
    """The stage end to end: params in, splits and meta.json out, the test split's origin printed."""
    import tasks.prepare
    root = photos[0].parent
    params = {"prepare": {"source": "imagefolder", "path": "train", "test_path": "val", "image_size": 8,
                          "grayscale": True, "normalize": {"mean": [0.5], "std": [0.5]}, "val_ratio": 0.25,
                          "test_ratio": 0.2, "seed": 0}}
    (root / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    tasks.prepare.main()
    meta = json.loads((root / "data/prepared/meta.json").read_text())
    assert meta["test_source"] == "test_path" and meta["classes"] == ["cat", "dog", "emu"]
    assert meta["mean"] == [0.5] and meta["std"] == [0.5] and meta["in_channels"] == 1
    with np.load(root / "data/prepared/test.npz") as f:
        assert f["x"].shape == (6, 1, 8, 8) and f["y"].tolist() == [1, 1, 1, 2, 2, 2]
        assert f["x"].min() >= -1.0 and f["x"].max() <= 1.0
    out = capsys.readouterr().out
    assert "test split val (prepare.test_path; test_ratio ignored)" in out and "normalize explicit" in out


def test_images_in_nested_folders_of_a_class_count_as_torchvisions_imagefolder_counts_them(tmp_path):
    root = photo_folder(tmp_path / "imgs", ("a", "b"), 2, 0)
    photo(root / "a" / "2024" / "trip" / "x.jpg", (30, 20), "RGB", 7)
    photo(root / "b" / ".thumbnails" / "y.png", (30, 20), "RGB", 8)  # a hidden folder is not data
    x, y, _ = load_source("imagefolder", str(root), 8, False)
    assert len(x) == 5 and y.tolist() == [0, 0, 0, 1, 1]


def test_npz_pixels_are_scaled_by_their_dtype_so_train_and_test_agree(tmp_path):
    for name, top in (("train", 4000), ("test", 1000)):  # uint16 files with different maxima
        x = np.full((6, 4, 4), top, np.uint16)
        np.savez(tmp_path / f"{name}.npz", x=x, y=np.arange(6) % 2)
    train, test = (load_source("npz", str(tmp_path / f"{n}.npz"), 4, False)[0] for n in ("train", "test"))
    assert np.allclose(train, 4000 / 65535) and np.allclose(test, 1000 / 65535)
    np.savez(tmp_path / "u8.npz", x=np.full((6, 4, 4), 51, np.uint8), y=np.arange(6) % 2)
    assert np.allclose(load_source("npz", str(tmp_path / "u8.npz"), 4, False)[0], 0.2)


def test_a_test_path_that_overlaps_path_is_refused(photos):
    train, _ = photos
    for test in (train, train / "cat"):
        with pytest.raises(ParamsError, match="overlaps prepare.path"):
            parse_section("prepare", {"source": "imagefolder", "path": str(train), "test_path": str(test),
                                      "image_size": 8, "grayscale": False, "normalize": "none", "val_ratio": 0.2,
                                      "test_ratio": 0.2, "seed": 0})


def test_a_test_file_without_class_names_maps_its_labels_by_index(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.random((40, 8, 8), dtype=np.float32), y=np.arange(40) % 4,
             classes=np.array(["ant", "bee", "cat", "dog"]))
    np.savez(tmp_path / "test.npz", x=rng.random((6, 8, 8), dtype=np.float32), y=np.array([0, 1, 2, 3, 3, 1]))
    data = load_data("npz", str(tmp_path / "train.npz"), 8, False, test_path=str(tmp_path / "test.npz"))
    assert data.classes == ["ant", "bee", "cat", "dog"] and data.test[1].tolist() == [0, 1, 2, 3, 3, 1]
    assert check_source("npz", str(tmp_path / "train.npz"), test_path=str(tmp_path / "test.npz"))["num_classes"] == 4
