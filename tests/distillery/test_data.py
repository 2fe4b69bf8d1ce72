import gzip
import pickle
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from distillery.data import check_source, load_data, load_source, prepare_splits, stratified_split
from distillery.core.errors import DataError


def make_npz(tmp_path, n=40, shape=(8, 8)):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x=rng.random((n, *shape)).astype(np.float32), y=np.arange(n) % 4)
    return path


def make_image_folder(tmp_path, n_per_class=5):
    for c in ("cat", "dog", "fox"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    return tmp_path / "imgs"


def cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}


def make_cifar(tmp_path, as_tar):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, seed in (("data_batch_1", 0), ("data_batch_2", 1), ("test_batch", 2)):
        (folder / name).write_bytes(pickle.dumps(cifar_batch(12, seed)))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    if not as_tar:
        return folder
    tar = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(folder, arcname=folder.name)
    return tar


def write_idx(path, arr, gz=False):
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def make_idx(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_idx(folder / "train-images-idx3-ubyte", rng.integers(0, 255, (20, 7, 7), dtype=np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte", (np.arange(20) % 5).astype(np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (10, 7, 7), dtype=np.uint8), gz=True)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", (np.arange(10) % 5).astype(np.uint8), gz=True)
    return folder


@pytest.mark.parametrize("source, maker, n, shape, n_classes", [
    ("npz", make_npz, 40, (1, 8, 8), 4),
    ("imagefolder", make_image_folder, 15, (3, 6, 6), 3),
    ("cifar", lambda p: make_cifar(p, as_tar=True), 36, (3, 32, 32), 10),
    ("cifar", lambda p: make_cifar(p, as_tar=False), 36, (3, 32, 32), 10),
    ("idx", make_idx, 30, (1, 7, 7), 5),
])
def test_every_format_loads_as_float_nchw_in_unit_range(tmp_path, source, maker, n, shape, n_classes):
    x, y, classes = load_source(source, str(maker(tmp_path)), shape[-1], False)
    assert x.dtype == np.float32 and x.shape == (n, *shape)
    assert y.dtype == np.int64 and len(y) == n
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert len(classes) == n_classes


def test_digits_default_is_bundled():
    x, y, classes = load_source("digits", None, 8, False)
    assert x.shape == (1797, 1, 8, 8) and len(classes) == 10


def test_pickle_carrying_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(DataError, match="refused to load"):
        load_source("cifar", str(folder), 32, False)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"not a zip", "not a readable NPZ"),
])
def test_a_file_in_the_wrong_format_names_the_file(tmp_path, content, message):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        load_source("npz", str(bad), 8, False)
    assert str(bad) in str(err.value)


def test_truncated_idx_is_a_clear_error(tmp_path):
    folder = make_idx(tmp_path)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        load_source("idx", str(folder), 7, False)


def test_split_is_deterministic_stratified_and_disjoint():
    y = np.repeat(np.arange(5), 40)
    a, b = stratified_split(y, 0.15, 0.2, seed=3), stratified_split(y, 0.15, 0.2, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not set(a["train"]) & set(a["test"]) and not set(a["val"]) & set(a["test"])
    assert sum(len(v) for v in a.values()) == len(y)
    assert np.bincount(y[a["test"]]).tolist() == [8] * 5
    assert not np.array_equal(stratified_split(y, 0.15, 0.2, seed=4)["test"], a["test"])


def test_prepare_resizes_and_standardises_on_train(tmp_path):
    x, y, classes = load_source("npz", str(make_npz(tmp_path, n=80)), 16, False)
    splits, meta = prepare_splits(x, y, classes, 16, False, 0.15, 0.2, 0)
    x, y = splits["test"]
    assert x.shape[1:] == (1, 16, 16) and x.dtype == np.float32 and y.dtype == np.int64
    assert abs(splits["train"][0].mean()) < 1e-4 and abs(splits["train"][0].std() - 1) < 1e-3
    assert meta["num_classes"] == 4 and meta["in_channels"] == 1


@pytest.mark.parametrize("as_tar", [True, False])
def test_cifar_official_test_batch_is_the_test_split(tmp_path, as_tar):
    path = str(make_cifar(tmp_path, as_tar))
    data = load_data("cifar", path, 32, False)
    assert data.test_source == "official" and len(data.x) == 24 and len(data.test[1]) == 12
    official = cifar_batch(12, seed=2)  # what make_cifar wrote as test_batch
    splits, meta = prepare_splits(*data[:3], 32, False, 0.15, 0.2, 0, normalize="none", test=data.test,
                                  test_source=data.test_source)
    assert np.array_equal(splits["test"][0], official[b"data"].reshape(-1, 3, 32, 32) / np.float32(255))
    assert splits["test"][1].tolist() == official[b"labels"]
    assert meta["test_source"] == "official" and meta["counts"]["test"] == 12
    assert meta["counts"]["train"] + meta["counts"]["val"] == 24
    assert check_source("cifar", path) == {"classes": [f"c{i}" for i in range(10)], "num_classes": 10,
                                           "in_channels": 3, "test_source": "official"}
    assert check_source("cifar", path, grayscale=True)["in_channels"] == 1


def test_idx_t10k_files_are_the_test_split(tmp_path):
    folder = make_idx(tmp_path)
    data = load_data("idx", str(folder), 7, False)
    assert data.test_source == "official" and len(data.x) == 20 and len(data.test[0]) == 10
    assert data.test[1].tolist() == (np.arange(10) % 5).tolist()
    assert check_source("idx", str(folder))["test_source"] == "official"
    for f in folder.glob("t10k-*"):  # without its test files the test split is carved again
        f.unlink()
    assert load_data("idx", str(folder), 7, False).test_source == "carved"
    assert check_source("idx", str(folder)) == {"classes": [str(i) for i in range(5)], "num_classes": 5,
                                                "in_channels": 1, "test_source": "carved"}


def test_idx_as_torchvision_leaves_it_counts_each_file_once_and_dotted_names_pair(tmp_path):
    folder = make_idx(tmp_path)  # torchvision's MNIST/raw holds every file twice: plain and gzipped
    for f in list(folder.iterdir()):
        if f.suffix == ".gz":
            f.with_name(f.name.removesuffix(".gz")).write_bytes(gzip.decompress(f.read_bytes()))
        else:
            f.with_name(f.name + ".gz").write_bytes(gzip.compress(f.read_bytes()))
    data = load_data("idx", str(folder), 7, False)
    assert len(data.x) == 20 and len(data.test[0]) == 10
    for f in list(folder.iterdir()):  # the dotted names of some mirrors: train-images.idx3-ubyte
        f.rename(f.with_name(f.name.replace("-idx", ".idx")))
    data = load_data("idx", str(folder), 7, False)
    assert len(data.x) == 20 and len(data.test[0]) == 10 and data.test_source == "official"
