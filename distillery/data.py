"""Data sources (bundled digits, NPZ, image folder, CIFAR python archive, IDX) and the splits.

Every loader returns `(x, y, classes)` with `x` float32 NCHW in [0, 1] and `y` int64; `prepare`
resizes, splits and standardises. Files from users are parsed defensively: the CIFAR archive is a
pickle, so it goes through an unpickler that admits only the types that format holds.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np

from distillery.core.errors import DataError



def load_digits_bundled() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), never downloaded."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    return x, d.target.astype(np.int64), [str(i) for i in range(10)]


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An NPZ with `x` (N,H,W), (N,H,W,C) or (N,C,H,W) and integer labels `y`."""
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"x", "y"} - set(f.files)
            if missing:
                raise DataError(f"{path}: NPZ lacks array(s) {sorted(missing)}; it needs 'x' (images) and 'y' (labels)")
            x, y = f["x"], f["y"]
    except (OSError, ValueError, EOFError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: not a readable NPZ file ({err}); save one with numpy.savez(path, x=..., y=...)") from None
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise DataError(f"{path}: 'x' has shape {x.shape}; expected (N,H,W), (N,H,W,C) or (N,C,H,W) images")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise DataError(f"{path}: 'y' must be a 1-D integer label array, got {y.dtype} {y.shape}")
    if len(y) != len(x):
        raise DataError(f"{path}: 'x' holds {len(x)} images but 'y' {len(y)} labels; give one label per image")
    x = x.astype(np.float32)
    if x.max(initial=0) > 1.0:
        x = x / 255.0 if x.max() <= 255 else x / x.max()
    n_classes = int(y.max()) + 1 if len(y) else 0
    return x, y.astype(np.int64), [str(i) for i in range(n_classes)]


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def load_image_folder(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One sub-folder per class, images inside; all images must share one size and mode."""
    from PIL import Image, UnidentifiedImageError
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{path}: no class sub-folders; an image folder holds one sub-folder per class")
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((path / name).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    arr = np.asarray(im.convert("RGB" if im.mode not in ("L", "1", "I;16") else "L"), dtype=np.float32)
            except (UnidentifiedImageError, OSError) as err:
                raise DataError(f"{f}: not a readable image ({err})") from None
            xs.append(arr / 255.0)
            ys.append(label)
    if not xs:
        raise DataError(f"{path}: no images found in the class sub-folders ({', '.join(IMAGE_SUFFIXES)})")
    shapes = {a.shape for a in xs}
    if len(shapes) > 1:
        raise DataError(f"{path}: images differ in size or mode {sorted(shapes)[:3]}; make them one size")
    x = np.stack(xs)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return x.astype(np.float32), np.asarray(ys, np.int64), classes


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


def load_cifar(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test), tarball or folder."""
    files = _cifar_members(path)
    names = [n for n in files if n.startswith("data_batch") or n == "test_batch"] or \
            [n for n in files if n in ("train", "test")]
    if not names:
        raise DataError(f"{path}: no CIFAR batches (data_batch_*, test_batch, or train/test for CIFAR-100)")
    xs, ys = [], []
    for n in sorted(names):
        batch = safe_unpickle(files[n], f"{path}:{n}")
        labels = batch.get("labels", batch.get("fine_labels"))
        if "data" not in batch or labels is None:
            raise DataError(f"{path}:{n}: batch lacks 'data' or 'labels'/'fine_labels'")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{path}:{n}: 'data' has shape {data.shape}; CIFAR rows are 3072 bytes (3x32x32)")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, np.int64))
    meta = next((files[m] for m in ("batches.meta", "meta") if m in files), None)
    y = np.concatenate(ys)
    classes = [str(i) for i in range(int(y.max()) + 1)]
    if meta is not None:
        m = safe_unpickle(meta, f"{path}:meta")
        raw = m.get("label_names", m.get("fine_label_names"))
        if raw is not None and len(raw) >= len(classes):
            classes = [c.decode() if isinstance(c, bytes) else str(c) for c in raw]
    return np.concatenate(xs).astype(np.float32) / 255.0, y, classes


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


def load_idx(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """IDX (MNIST format): a folder of *images-idx3-ubyte[.gz] and *labels-idx1-ubyte[.gz] pairs."""
    images = sorted(f for f in path.iterdir() if "images" in f.name and "idx3" in f.name)
    if not images:
        raise DataError(f"{path}: no '*images-idx3-ubyte' files; an IDX folder holds image/label file pairs")
    xs, ys = [], []
    for img in images:
        lbl = path / img.name.replace("images-idx3", "labels-idx1")
        if not lbl.exists():
            raise DataError(f"{img}: its labels file {lbl.name} is missing")
        x, y = _read_idx(img), _read_idx(lbl)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{img}: images {x.shape} and labels {y.shape} do not pair up")
        xs.append(x)
        ys.append(y)
    x = np.concatenate(xs).astype(np.float32)
    y = np.concatenate(ys).astype(np.int64)
    return (x / 255.0)[:, None], y, [str(i) for i in range(int(y.max()) + 1)]


LOADERS = {"npz": load_npz, "imagefolder": load_image_folder, "cifar": load_cifar, "idx": load_idx}


def load_source(source: str, path: str | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load a data set by its `prepare.source` name."""
    if source == "digits":
        return load_digits_bundled()
    if path is None:
        raise DataError(f"prepare.source = {source!r} needs prepare.path (a file or folder)")
    x, y, classes = LOADERS[source](Path(path))
    if len(x) == 0:
        raise DataError(f"{path}: the data set is empty")
    if len(np.unique(y)) < 2:
        raise DataError(f"{path}: only {len(np.unique(y))} class found; a classifier needs at least 2")
    if y.min() < 0:
        raise DataError(f"{path}: negative labels ({int(y.min())}); labels must be 0..n_classes-1")
    return x, y, classes


def stratified_split(y: np.ndarray, val_ratio: float, test_ratio: float, seed: int) -> dict[str, np.ndarray]:
    """Index arrays for train / val / test, stratified by label, fixed by the seed."""
    from sklearn.model_selection import train_test_split
    idx = np.arange(len(y))
    counts = np.bincount(y)
    strat = y if counts[counts > 0].min() >= 3 else None
    rest, test = train_test_split(idx, test_size=test_ratio, random_state=seed, stratify=strat)
    val_share = val_ratio / (1 - test_ratio)
    train, val = train_test_split(rest, test_size=val_share, random_state=seed,
                                  stratify=None if strat is None else y[rest])
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def load_split(prepared: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A prepared split as written by `prepare`: (x float32 NCHW, y int64)."""
    path = prepared / f"{split}.npz"
    if not path.exists():
        raise DataError(f"{path}: missing; run the prepare stage first (dvc repro prepare)")
    with np.load(path, allow_pickle=False) as f:
        return f["x"], f["y"]


def resize(x: np.ndarray, size: int, grayscale: bool) -> np.ndarray:
    """Bilinear resize of NCHW images to size x size (antialiased when shrinking); optional RGB -> gray."""
    import torch
    import torch.nn.functional as F
    t = torch.from_numpy(x)
    if grayscale and t.shape[1] == 3:
        t = (t * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=t.shape[-1] > size)
    return t.numpy().astype(np.float32)


def prepare_splits(x: np.ndarray, y: np.ndarray, classes: list[str], image_size: int, grayscale: bool,
                   val_ratio: float, test_ratio: float, seed: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Images -> resized, split (stratified, seeded), standardised with the train split's statistics; and the meta."""
    if y.max() >= len(classes):
        raise DataError(f"labels go up to {int(y.max())} but only {len(classes)} classes were found")
    x = resize(x, image_size, grayscale)
    idx = stratified_split(y, val_ratio, test_ratio, seed)
    mean = x[idx["train"]].mean(axis=(0, 2, 3))
    std = x[idx["train"]].std(axis=(0, 2, 3)) + 1e-6
    norm = ((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
    splits = {name: (norm[i], y[i].astype(np.int64)) for name, i in idx.items()}
    meta = {"classes": classes, "num_classes": len(classes), "in_channels": int(x.shape[1]),
            "image_size": image_size, "mean": mean.tolist(), "std": std.tolist(),
            "counts": {name: int(len(i)) for name, i in idx.items()}}
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


def _check_labels(y: np.ndarray, n_images: int, classes: list[str] | None, where: str) -> None:
    if n_images == 0 or len(y) == 0:
        raise DataError(f"{where}: the data set is empty (0 images); it needs images of at least 2 classes")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) != n_images:
        raise DataError(f"{where}: {n_images} images but {len(y)} labels; give one label per image")
    if y.min() < 0:
        raise DataError(f"{where}: label {int(y.min())} is negative; labels must be 0..n_classes-1")
    if classes is not None and y.max() >= len(classes):
        raise DataError(f"{where}: label {int(y.max())} is out of range for {len(classes)} classes {classes[:5]}; "
                        f"labels must be 0..{len(classes) - 1}")
    if len(np.unique(y)) < 2:
        raise DataError(f"{where}: only 1 class in the labels ({int(y[0])}); a classifier needs at least 2")


def check_source(source: str, path: str | None) -> None:
    """The fast check before a run: headers, shapes and labels of the raw data, images not decoded; writes nothing."""
    import zipfile
    if source == "digits":
        return
    p = Path(path)
    if source == "npz":
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
        _check_labels(y, shape[0], classes, str(p))
    elif source == "imagefolder":
        from PIL import Image, UnidentifiedImageError
        classes = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
        if len(classes) < 2:
            raise DataError(f"{p}: {len(classes)} class sub-folder(s); an image folder needs one sub-folder per class, at least 2")
        sizes = set()
        for d in classes:
            images = [f for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
            if not images:
                raise DataError(f"{d}: class folder without images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            for f in images:
                try:
                    with Image.open(f) as im:  # reads the header only
                        sizes.add(im.size)
                except (UnidentifiedImageError, OSError) as err:
                    raise DataError(f"{f}: not a readable image ({err})") from None
        if len(sizes) > 1:
            raise DataError(f"{p}: images differ in size {sorted(sizes)[:3]}; make them one size")
    elif source == "idx":
        images = sorted(f for f in p.iterdir() if "images" in f.name and "idx3" in f.name)
        if not images:
            raise DataError(f"{p}: no '*images-idx3-ubyte' files; an IDX folder holds image/label file pairs")
        for img in images:
            lbl = p / img.name.replace("images-idx3", "labels-idx1")
            if not lbl.exists():
                raise DataError(f"{img}: its labels file {lbl.name} is missing")
            x, y = _read_idx(img), _read_idx(lbl)
            if x.ndim != 3:
                raise DataError(f"{img}: images have shape {x.shape}; IDX images are (N,H,W)")
            _check_labels(y.astype(np.int64), len(x), None, str(lbl))
    elif source == "cifar":
        if p.is_dir():
            names = {f.name for f in p.rglob("*") if f.is_file()}
        else:
            try:
                with tarfile.open(p) as tar:
                    names = {Path(m.name).name for m in tar.getmembers() if m.isfile()}
            except (tarfile.TarError, OSError, EOFError) as err:
                raise DataError(f"{p}: not a readable CIFAR tarball ({err}); give cifar-10-python.tar.gz or its extracted folder") from None
        if not any(n.startswith("data_batch") or n in ("test_batch", "train", "test") for n in names):
            raise DataError(f"{p}: no CIFAR batches (data_batch_*, test_batch, or train/test for CIFAR-100)")
