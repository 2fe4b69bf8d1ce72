"""Data sources (bundled digits, NPZ, image folder, CIFAR python archive, IDX) and the splits.

Every source loads as float32 NCHW images in [0, 1], int64 labels and class names; `prepare` fits
them to one square size the way torchvision's `Resize(size)` + `CenterCrop(size)` does, splits them
and normalises them. The test split is the user's own `test_path` when there is one, else the
source's official test files (CIFAR `test_batch`/`test`, IDX `t10k-*`), else a stratified share
carved from the data. An image folder is fitted image by image while it is read, so a folder of
big photos never sits in memory at full size. Files from users are parsed defensively: the CIFAR
archive is a pickle, so it goes through an unpickler that admits only the types that format holds.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from distillery.core.errors import DataError

Files = dict[str, tuple[np.ndarray, np.ndarray]]  # file (or batch) name -> (x, y): an official test split is whole files


def load_digits_bundled() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), never downloaded."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    return x, d.target.astype(np.int64), [str(i) for i in range(10)]


def _channels_last(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and shape[-1] in (1, 3) and shape[1] not in (1, 3)


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An NPZ with `x` (N,H,W), (N,H,W,C) or (N,C,H,W), integer labels `y` and, optionally, class names `classes`."""
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"x", "y"} - set(f.files)
            if missing:
                raise DataError(f"{path}: NPZ lacks array(s) {sorted(missing)}; it needs 'x' (images) and 'y' (labels)")
            x, y = f["x"], f["y"]
            names = [str(c) for c in f["classes"]] if "classes" in f.files else None
    except (OSError, ValueError, EOFError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: not a readable NPZ file ({err}); save one with numpy.savez(path, x=..., y=...)") from None
    if x.ndim == 3:
        x = x[:, None]
    elif _channels_last(x.shape):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise DataError(f"{path}: 'x' has shape {x.shape}; expected (N,H,W), (N,H,W,C) or (N,C,H,W) images")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise DataError(f"{path}: 'y' must be a 1-D integer label array, got {y.dtype} {y.shape}")
    if len(y) != len(x):
        raise DataError(f"{path}: 'x' holds {len(x)} images but 'y' {len(y)} labels; give one label per image")
    # pixels to [0, 1] by the dtype's range, so a train file and a test file are scaled alike
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max if x.dtype != np.uint8 and x.max(initial=0) > 255 else 255)
    else:
        x = x.astype(np.float32)
        if x.max(initial=0) > 1.0:
            x = x / 255.0 if x.max() <= 255 else x / x.max()
    n_classes = int(y.max()) + 1 if len(y) else 0
    return x, y.astype(np.int64), names if names is not None else [str(i) for i in range(n_classes)]


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def fitted_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) after torchvision's `Resize(size)`: the shorter side becomes `size`, the longer keeps the aspect, floored."""
    return (int(size * h / w), size) if w <= h else (size, int(size * w / h))


def _crop_origin(h: int, w: int, size: int) -> tuple[int, int]:
    """Top-left corner of torchvision's `CenterCrop(size)`, with its rounding: an odd margin falls on the same side."""
    return round((h - size) / 2), round((w - size) / 2)


def fit_image(im, size: int, grayscale: bool) -> np.ndarray:
    """A PIL image as float32 CHW in [0, 1]: RGB (L when `grayscale`), the shorter side resized to `size`
    (bilinear, antialiased: PIL's own resize, as torchvision does it on PIL images), then the centre square."""
    from PIL import Image
    if im.mode == "F" or im.mode.startswith("I"):  # 16/32-bit greyscale: resized in float, not cut to 8 bits first
        im = Image.fromarray(np.asarray(im, np.float32) / (1.0 if im.mode == "F" else 65535.0))
    else:
        im = im.convert("L" if grayscale else "RGB")
    h, w = fitted_size(im.height, im.width, size)
    if (h, w) != (im.height, im.width):
        im = im.resize((w, h), Image.Resampling.BILINEAR)
    top, left = _crop_origin(h, w, size)
    a = np.asarray(im.crop((left, top, left + size, top + size)), np.float32)
    if im.mode == "F":
        a = np.clip(a, 0.0, 1.0)[None]
        return a if grayscale else np.repeat(a, 3, axis=0)
    return a[None] / 255.0 if a.ndim == 2 else a.transpose(2, 0, 1) / 255.0


def _class_folders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """The images of a class folder; hidden files (macOS's ._photo.jpg) are not images."""
    return [f for f in sorted(folder.rglob("*"))  # nested folders too, as torchvision's ImageFolder walks them
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
            and not any(part.startswith(".") for part in f.relative_to(folder).parts)]


def load_image_folder(path: Path, image_size: int, grayscale: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One sub-folder per class; images of any size and mode, each fitted (`fit_image`) as it is read."""
    from PIL import Image
    classes = _class_folders(path)
    if not classes:
        raise DataError(f"{path}: no class sub-folders; an image folder holds one sub-folder per class")
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in _image_files(path / name):
            try:
                with Image.open(f) as im:
                    xs.append(fit_image(im, image_size, grayscale))
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                raise DataError(f"{f}: not a readable image ({err}); remove it or save it again as PNG or JPEG") from None
            ys.append(label)
    if not xs:
        raise DataError(f"{path}: no images found in the class sub-folders ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return np.stack(xs), np.asarray(ys, np.int64), classes


class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR batches hold dicts, lists, bytes, str, ints and numpy arrays; nothing else loads."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: not a type the CIFAR format holds")


def safe_unpickle(data: bytes, source: str) -> dict:
    """Unpickle a CIFAR batch, refusing any class outside the format's own types."""
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise DataError(f"{source}: {err}") from None
    except Exception as err:  # truncated or not a pickle at all
        raise DataError(f"{source}: not a CIFAR python batch ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{source}: a CIFAR batch is a dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_members(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {f.name: f.read_bytes() for f in path.rglob("*") if f.is_file()}
    try:
        with tarfile.open(path) as tar:
            return {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable CIFAR tarball ({err}); give cifar-10-python.tar.gz or its extracted folder") from None


CIFAR_META = ("batches.meta", "meta")  # CIFAR-10's and CIFAR-100's class names
CIFAR_TEST = ("test_batch", "test")  # CIFAR-10's and CIFAR-100's official test split


def _cifar_batches(names: Iterable[str]) -> list[str]:
    names = set(names)
    return sorted(n for n in names if n.startswith("data_batch") or n == "test_batch") or \
        sorted(n for n in names if n in ("train", "test"))


def _cifar_class_names(members: Mapping[str, bytes], path: Path) -> list[str] | None:
    meta = next((members[m] for m in CIFAR_META if m in members), None)
    if meta is None:
        return None
    m = safe_unpickle(meta, f"{path}:meta")
    raw = m.get("label_names", m.get("fine_label_names"))
    return None if raw is None else [c.decode() if isinstance(c, bytes) else str(c) for c in raw]


def load_cifar(path: Path) -> tuple[Files, list[str]]:
    """CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test), tarball or folder; one entry per batch."""
    members = _cifar_members(path)
    names = _cifar_batches(members)
    if not names:
        raise DataError(f"{path}: no CIFAR batches (data_batch_*, test_batch, or train/test for CIFAR-100)")
    files = {}
    for n in names:
        batch = safe_unpickle(members[n], f"{path}:{n}")
        labels = batch.get("labels", batch.get("fine_labels"))
        if "data" not in batch or labels is None:
            raise DataError(f"{path}:{n}: batch lacks 'data' or 'labels'/'fine_labels'")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{path}:{n}: 'data' has shape {data.shape}; CIFAR rows are 3072 bytes (3x32x32)")
        files[n] = (data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, np.asarray(labels, np.int64))
    y = np.concatenate([y for _, y in files.values()])
    n_classes = int(y.max()) + 1 if len(y) else 0
    names = _cifar_class_names(members, path)
    return files, names if names is not None and len(names) >= n_classes else [str(i) for i in range(n_classes)]


def _read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in dtypes:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", ndim, 4).astype(int)
    dtype = np.dtype(dtypes[raw[2]])
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)) * dtype.itemsize:
        raise DataError(f"{path}: IDX header says {tuple(dims)} but the file is truncated or too long")
    return np.frombuffer(body, dtype).reshape(dims)


def _idx_pairs(path: Path) -> list[tuple[Path, Path]]:
    """(images, labels) file pairs; `train-images-idx3-ubyte` and `train-images.idx3-ubyte` namings both pair up,
    and a file present both plain and gzipped (torchvision's MNIST/raw folder) counts once, plain."""
    found = sorted(f for f in path.iterdir() if "images" in f.name and "idx3" in f.name)
    plain = {f.name for f in found if f.suffix != ".gz"}
    images = [f for f in found if not (f.suffix == ".gz" and f.name.removesuffix(".gz") in plain)]
    if not images:
        raise DataError(f"{path}: no '*images-idx3-ubyte' files; an IDX folder holds image/label file pairs")
    pairs = []
    for img in images:
        lbl = path / img.name.replace("images", "labels").replace("idx3", "idx1")
        if not lbl.exists() and lbl.suffix != ".gz" and lbl.with_name(lbl.name + ".gz").exists():
            lbl = lbl.with_name(lbl.name + ".gz")
        if not lbl.exists():
            raise DataError(f"{img}: its labels file {lbl.name} is missing")
        pairs.append((img, lbl))
    return pairs


def load_idx(path: Path) -> tuple[Files, list[str]]:
    """IDX (MNIST format): a folder of *images-idx3-ubyte[.gz] and *labels-idx1-ubyte[.gz] pairs; one entry per pair."""
    files = {}
    for img, lbl in _idx_pairs(path):
        x, y = _read_idx(img), _read_idx(lbl)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{img}: images {x.shape} and labels {y.shape} do not pair up")
        files[img.name] = ((x.astype(np.float32) / 255.0)[:, None], y.astype(np.int64))
    n_classes = max(int(y.max()) + 1 if len(y) else 0 for _, y in files.values())
    return files, [str(i) for i in range(n_classes)]


SOURCES = ("digits", "npz", "imagefolder", "cifar", "idx")


def _is_official_test(source: str, name: str) -> bool:
    return (source == "cifar" and name in CIFAR_TEST) or (source == "idx" and name.startswith("t10k-"))


def _test_source(source: str, names: Iterable[str]) -> str:
    """Whether files of these names bring an official test split beside the training data ("official") or not."""
    names = list(names)
    official = [n for n in names if _is_official_test(source, n)]
    return "official" if official and len(official) < len(names) else "carved"


def _read_files(source: str, path: str | None, image_size: int, grayscale: bool) -> tuple[Files, list[str]]:
    if source not in SOURCES:
        raise DataError(f"prepare.source = {source!r}: unknown; allowed: {', '.join(SOURCES)}")
    if source == "digits":
        x, y, classes = load_digits_bundled()
        return {"digits": (x, y)}, classes
    if path is None:
        raise DataError(f"prepare.source = {source!r} needs prepare.path (a file or folder)")
    p = Path(path)
    if source in ("cifar", "idx"):
        return (load_cifar if source == "cifar" else load_idx)(p)
    x, y, classes = load_npz(p) if source == "npz" else load_image_folder(p, image_size, grayscale)
    return {p.name: (x, y)}, classes


def _concat(parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    parts = list(parts)
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def _check_loaded(x: np.ndarray, y: np.ndarray, classes: list[str], where: str | None, min_classes: int) -> None:
    if len(x) == 0:
        raise DataError(f"{where}: the data set is empty")
    if len(np.unique(y)) < min_classes:
        raise DataError(f"{where}: only {len(np.unique(y))} class found; a classifier needs at least {min_classes}")
    if y.min() < 0:
        raise DataError(f"{where}: negative labels ({int(y.min())}); labels must be 0..n_classes-1")
    if y.max() >= len(classes):
        raise DataError(f"{where}: label {int(y.max())} is out of range for {len(classes)} classes; "
                        f"labels must be 0..{len(classes) - 1}")


def load_source(source: str, path: str | None, image_size: int, grayscale: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every image of a data set by its `prepare.source` name, official test files included. An image folder
    comes fitted to `image_size` already (it is fitted while read); other sources keep their size for `resize`."""
    files, classes = _read_files(source, path, image_size, grayscale)
    x, y = _concat(files.values())
    _check_loaded(x, y, classes, path, min_classes=2)
    return x, y, classes


DIGITS_TEST_PATH = "prepare.test_path needs your own data; prepare.source = 'digits' is the bundled set, use npz"


class RawData(NamedTuple):
    """The pool that train and val are split from, and the test split when it is not carved from the pool."""
    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    test: tuple[np.ndarray, np.ndarray] | None  # None: carve it from the pool with test_ratio
    test_source: str  # "test_path" | "official" | "carved"


def _test_labels(test_classes: list[str], classes: list[str], path: str | None, test_path: str) -> np.ndarray:
    """For each test label, the label of the same class in the train data: by name, or by index when the test
    file names no classes of its own (an NPZ without `classes`, a CIFAR folder without its meta file)."""
    known = set(classes)
    unknown = [c for c in test_classes if c not in known]
    by_index = test_classes == [str(i) for i in range(len(test_classes))] and len(test_classes) <= len(classes)
    if unknown and by_index:
        return np.arange(len(test_classes), dtype=np.int64)
    if unknown:
        more = ", ..." if len(classes) > 10 else ""
        raise DataError(f"{test_path}: test class(es) {', '.join(map(repr, unknown[:5]))} not among the classes of {path} "
                        f"({', '.join(classes[:10])}{more}); give the test data only classes the train data has")
    return np.array([classes.index(c) for c in test_classes], np.int64)


def load_data(source: str, path: str | None, image_size: int, grayscale: bool, test_path: str | None = None) -> RawData:
    """The raw data and where its test split comes from: `test_path` (labels matched to the classes of `path` by
    name), else the source's official test files (CIFAR test_batch/test, IDX t10k-*), else carved later."""
    files, classes = _read_files(source, path, image_size, grayscale)
    test, test_source = None, "carved"
    if test_path is not None:
        if source == "digits":
            raise DataError(DIGITS_TEST_PATH)
        test_files, test_classes = _read_files(source, test_path, image_size, grayscale)
        xt, yt = _concat(test_files.values())
        _check_loaded(xt, yt, test_classes, test_path, min_classes=1)
        test, test_source = (xt, _test_labels(test_classes, classes, path, test_path)[yt]), "test_path"
    elif _test_source(source, files) == "official":
        official = [n for n in files if _is_official_test(source, n)]
        test, test_source = _concat(files.pop(n) for n in official), "official"
        _check_loaded(*test, classes, f"{path} ({', '.join(official)})", min_classes=1)
    x, y = _concat(files.values())
    _check_loaded(x, y, classes, path, min_classes=2)
    return RawData(x, y, classes, test, test_source)


def stratified_split(y: np.ndarray, val_ratio: float, test_ratio: float, seed: int) -> dict[str, np.ndarray]:
    """Index arrays for train / val / test, stratified by label, fixed by the seed; test_ratio 0 carves no test."""
    from sklearn.model_selection import train_test_split
    idx = np.arange(len(y))
    counts = np.bincount(y)
    strat = y if counts[counts > 0].min() >= 3 else None
    try:
        rest, test = train_test_split(idx, test_size=test_ratio, random_state=seed, stratify=strat) \
            if test_ratio > 0 else (idx, idx[:0])
        val_share = val_ratio / (1 - test_ratio)
        train, val = train_test_split(rest, test_size=val_share, random_state=seed,
                                      stratify=None if strat is None else y[rest])
    except ValueError as err:  # too few images for the shares
        raise DataError(f"cannot split {len(y)} images with val_ratio {val_ratio} and test_ratio {test_ratio} ({err}); "
                        "give more images or larger ratios") from None
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def load_split(prepared: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A prepared split as written by `prepare`: (x float32 NCHW, y int64)."""
    path = prepared / f"{split}.npz"
    if not path.exists():
        raise DataError(f"{path}: missing; run the prepare stage first (dvc repro prepare)")
    with np.load(path, allow_pickle=False) as f:
        return f["x"], f["y"]


def resize(x: np.ndarray, size: int, grayscale: bool) -> np.ndarray:
    """NCHW images to size x size as torchvision's Resize(size) + CenterCrop(size) would: the shorter side to
    `size` (bilinear, antialiased when shrinking), then the centre square; optional RGB -> gray."""
    import torch
    import torch.nn.functional as F
    t = torch.from_numpy(x)
    if grayscale and t.shape[1] == 3:
        t = (t * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    h, w = t.shape[-2:]
    nh, nw = fitted_size(h, w, size)
    if (nh, nw) != (h, w):
        t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=h > nh or w > nw)
    top, left = _crop_origin(nh, nw, size)
    return t[..., top:top + size, left:left + size].numpy().astype(np.float32)


NORMALIZE_MODES = ("dataset", "none")  # or explicit {mean: [...], std: [...]}


def _explicit_stats(normalize) -> tuple[list[float], list[float]] | None:
    """(mean, std) of an explicit normalisation (a mapping or a config with .mean/.std); None for a named mode."""
    if isinstance(normalize, str):
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize = {normalize!r}: use {' | '.join(NORMALIZE_MODES)} or {{mean: [...], std: [...]}}")
        return None
    if isinstance(normalize, Mapping):
        return list(normalize["mean"]), list(normalize["std"])
    return list(normalize.mean), list(normalize.std)


def _channel_stats(normalize, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    channels = train.shape[1]
    explicit = _explicit_stats(normalize)
    if explicit is not None:
        mean, std = (np.asarray(v, np.float32) for v in explicit)
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"prepare.normalize gives {len(mean)} mean and {len(std)} std values but the images have "
                            f"{channels} channel(s) (after prepare.grayscale); give one mean and one std per channel")
        if (std <= 0).any():
            raise DataError(f"prepare.normalize std {std.tolist()} must be > 0 for every channel")
        return mean, std
    if normalize == "none":
        return np.zeros(channels, np.float32), np.ones(channels, np.float32)
    return train.mean(axis=(0, 2, 3)), train.std(axis=(0, 2, 3)) + 1e-6


def prepare_splits(x: np.ndarray, y: np.ndarray, classes: list[str], image_size: int, grayscale: bool,
                   val_ratio: float, test_ratio: float, seed: int, *, normalize="dataset",
                   test: tuple[np.ndarray, np.ndarray] | None = None,
                   test_source: str = "test_path") -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Images -> resized, split (stratified, seeded), normalised; and the meta.

    `normalize`: "dataset" (per-channel mean/std of the train split), "none" (pixels stay in [0, 1]) or
    {"mean": [...], "std": [...]} per channel. With `test` (x, y) given, that is the test split (recorded as
    `test_source`) and only val is carved from `x`; test_ratio is then unused.
    """
    if y.max() >= len(classes):
        raise DataError(f"labels go up to {int(y.max())} but only {len(classes)} classes were found")
    x = resize(x, image_size, grayscale)
    idx = stratified_split(y, val_ratio, test_ratio if test is None else 0.0, seed)
    mean, std = _channel_stats(normalize, x[idx["train"]])

    def scale(a: np.ndarray) -> np.ndarray:
        return ((a - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)

    norm = scale(x)
    splits = {name: (norm[i], y[i].astype(np.int64)) for name, i in idx.items()}
    if test is not None:
        xt = resize(test[0], image_size, grayscale)
        if xt.shape[1] != x.shape[1]:
            raise DataError(f"the test split has {xt.shape[1]} channel(s) but the train data {x.shape[1]}; "
                            "give both in one format (or set prepare.grayscale: true)")
        splits["test"] = (scale(xt), test[1].astype(np.int64))
    explicit = _explicit_stats(normalize) is not None
    meta = {"classes": classes, "num_classes": len(classes), "in_channels": int(x.shape[1]),
            "image_size": image_size, "normalize": "explicit" if explicit else normalize,
            "mean": mean.tolist(), "std": std.tolist(),
            "test_source": "carved" if test is None else test_source,
            "counts": {name: len(s[1]) for name, s in splits.items()}}
    return splits, meta


def load_prepared(prepared: Path | str) -> tuple[dict, tuple, tuple, tuple]:
    """(meta, train, val, test) from a folder of prepared splits (as the `prepare` stage writes them)."""
    prepared = Path(prepared)
    meta_path = prepared / "meta.json"
    if not meta_path.exists():
        raise DataError(f"{meta_path}: missing; prepare the data first (dvc repro prepare)")
    meta = json.loads(meta_path.read_text())
    return (meta, *(load_split(prepared, s) for s in ("train", "val", "test")))


def input_shape(meta: dict, batch: int = 1) -> list[int]:
    """NCHW shape of a batch of prepared images."""
    return [batch, meta["in_channels"], meta["image_size"], meta["image_size"]]


def calibration_subset(x: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, str]:
    """A seeded subset of `x` for calibration, and its sha256 so the record says exactly which."""
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=min(size, len(x)), replace=False))
    subset = np.ascontiguousarray(x[idx])
    return subset, hashlib.sha256(subset.tobytes()).hexdigest()


def write_bundled_digits(path: Path | str) -> None:
    """Export scikit-learn's bundled digits as the project's default raw data file."""
    x, y, _ = load_digits_bundled()
    with open(path, "wb") as f:
        np.savez_compressed(f, x=x[:, 0], y=y)


def _npy_header(zf, name: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in an NPZ, read from its header without loading the data."""
    try:
        with zf.open(f"{name}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: array {name!r} is unreadable ({err}); save the file with numpy.savez(path, x=..., y=...)") from None
    return shape, dtype


def _check_labels(y: np.ndarray, n_images: int, classes: list[str] | None, where: str, min_classes: int = 2) -> None:
    if n_images == 0 or len(y) == 0:
        raise DataError(f"{where}: the data set is empty (0 images); it needs images of at least {min_classes} "
                        f"class{'es' if min_classes > 1 else ''}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) != n_images:
        raise DataError(f"{where}: {n_images} images but {len(y)} labels; give one label per image")
    if y.min() < 0:
        raise DataError(f"{where}: label {int(y.min())} is negative; labels must be 0..n_classes-1")
    if classes is not None and y.max() >= len(classes):
        raise DataError(f"{where}: label {int(y.max())} is out of range for {len(classes)} classes {classes[:5]}; "
                        f"labels must be 0..{len(classes) - 1}")
    if len(np.unique(y)) < min_classes:
        raise DataError(f"{where}: only 1 class in the labels ({int(y[0])}); a classifier needs at least {min_classes}")


def _inspect_npz(p: Path, grayscale: bool, min_classes: int) -> dict:
    import zipfile
    try:
        zf = zipfile.ZipFile(p)
    except (OSError, zipfile.BadZipFile) as err:
        raise DataError(f"{p}: not a readable NPZ file ({err}); save one with numpy.savez(path, x=..., y=...)") from None
    with zf:
        names = {n.removesuffix(".npy") for n in zf.namelist()}
        missing = {"x", "y"} - names
        if missing:
            raise DataError(f"{p}: NPZ lacks array(s) {sorted(missing)}; it needs 'x' (images) and 'y' (labels)")
        shape, dtype = _npy_header(zf, "x", p)
        if len(shape) not in (3, 4) or not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
            raise DataError(f"{p}: 'x' has shape {shape} and dtype {dtype}; expected numeric images "
                            "(N,H,W), (N,H,W,C) or (N,C,H,W)")
    try:
        with np.load(p, allow_pickle=False) as f:
            y = f["y"]
            classes = [str(c) for c in f["classes"]] if "classes" in f.files else None
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{p}: 'y' is unreadable ({err}); labels must be a 1-D integer array") from None
    _check_labels(y, shape[0], classes, str(p), min_classes)
    channels = 1 if len(shape) == 3 else shape[-1] if _channels_last(shape) else shape[1]
    classes = classes if classes is not None else [str(i) for i in range(int(y.max()) + 1)]
    return {"classes": classes, "in_channels": 1 if grayscale and channels == 3 else channels, "test_source": "carved"}


def _inspect_image_folder(p: Path, grayscale: bool, min_classes: int) -> dict:
    from PIL import Image
    classes = _class_folders(p)
    if len(classes) < min_classes:
        raise DataError(f"{p}: {len(classes)} class sub-folder(s); an image folder needs one sub-folder per class, "
                        f"at least {min_classes}")
    for name in classes:
        images = _image_files(p / name)
        if not images:
            raise DataError(f"{p / name}: class folder without images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for f in images:
            try:
                with Image.open(f):  # reads the header only; any size and mode is fitted by prepare
                    pass
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                raise DataError(f"{f}: not a readable image ({err}); remove it or save it again as PNG or JPEG") from None
    return {"classes": classes, "in_channels": 1 if grayscale else 3, "test_source": "carved"}


def _inspect_idx(p: Path, grayscale: bool, min_classes: int) -> dict:
    n_classes, pairs = 0, _idx_pairs(p)
    for img, lbl in pairs:
        x, y = _read_idx(img), _read_idx(lbl)
        if x.ndim != 3:
            raise DataError(f"{img}: images have shape {x.shape}; IDX images are (N,H,W)")
        _check_labels(y.astype(np.int64), len(x), None, str(lbl), min_classes)
        n_classes = max(n_classes, int(y.max()) + 1)
    return {"classes": [str(i) for i in range(n_classes)], "in_channels": 1,
            "test_source": _test_source("idx", (img.name for img, _ in pairs))}


def _inspect_cifar(p: Path, grayscale: bool, min_classes: int) -> dict:
    if p.is_dir():
        members = {f.name: f for f in p.rglob("*") if f.is_file()}
        meta = {m: members[m].read_bytes() for m in CIFAR_META if m in members}
    else:
        try:
            with tarfile.open(p) as tar:  # the batches are listed, not read; only the small meta file is
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                meta = {m: tar.extractfile(members[m]).read() for m in CIFAR_META if m in members}
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"{p}: not a readable CIFAR tarball ({err}); give cifar-10-python.tar.gz or its extracted folder") from None
    batches = _cifar_batches(members)
    if not batches:
        raise DataError(f"{p}: no CIFAR batches (data_batch_*, test_batch, or train/test for CIFAR-100)")
    classes = _cifar_class_names(meta, p)
    if classes is None:  # no class names: the labels say how many classes there are
        classes = load_cifar(p)[1]
    return {"classes": classes, "in_channels": 1 if grayscale else 3, "test_source": _test_source("cifar", batches)}


INSPECT = {"npz": _inspect_npz, "imagefolder": _inspect_image_folder, "idx": _inspect_idx, "cifar": _inspect_cifar}


def check_source(source: str, path: str | None, test_path: str | None = None, grayscale: bool = False,
                 normalize=None) -> dict:
    """The fast check before a run: headers, shapes and labels of the raw data (and of `test_path`), images not
    decoded; writes nothing. Returns what `prepare` will make of it, for comparing with a model before training:
    {"classes": [...], "num_classes": int, "in_channels": int (after grayscale), "test_source": str}."""
    if source == "digits":
        if test_path is not None:
            raise DataError(DIGITS_TEST_PATH)
        found = {"classes": [str(i) for i in range(10)], "in_channels": 1, "test_source": "carved"}
    elif path is None:
        raise DataError(f"prepare.source = {source!r} needs prepare.path (a file or folder)")
    else:
        found = INSPECT[source](Path(path), grayscale, 2)
    if test_path is not None:
        test = INSPECT[source](Path(test_path), grayscale, 1)
        _test_labels(test["classes"], found["classes"], path, test_path)
        if test["in_channels"] != found["in_channels"]:
            raise DataError(f"{test_path}: test images have {test['in_channels']} channel(s) but those of {path} "
                            f"{found['in_channels']}; give both in one format (or set prepare.grayscale: true)")
        found["test_source"] = "test_path"
    explicit = None if normalize is None else _explicit_stats(normalize)
    if explicit is not None and len(explicit[0]) != found["in_channels"]:
        raise DataError(f"prepare.normalize gives {len(explicit[0])} mean/std values but {path or 'the data'} makes "
                        f"{found['in_channels']}-channel images (prepare.grayscale = {str(grayscale).lower()}); "
                        "give one mean and one std per channel")
    return {"classes": found["classes"], "num_classes": len(found["classes"]),
            "in_channels": found["in_channels"], "test_source": found["test_source"]}
