"""Datasets as tensors: find (or download) the files, split, normalize, cache.

Contract: `load_data(spec, seed, device)` returns a `DataBundle` of float32 features
and int64 labels split into train / validation / test and normalized with training
statistics only; for `dataset: custom` it returns what the user's factory gave (see
`dlsearch.trial.custom_data`): a `DataBundle`, or a `DatasetBundle` of torch Datasets read in
batches. Anything wrong with the data raises `DataError`, whose message is
shown to the user as-is. Where files are looked for, and the checks `dlsearch validate`
runs without downloading or writing anything (`check_data_available`), live in
`dlsearch.trial.data_files`, which imports no torch; their names are importable from here too.

Only torch, numpy and the standard library are imported here; scikit-learn (digits,
synthetic) and pandas (csv) are imported when those datasets are asked for.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

from dlsearch.config.spec import DataSpec
from dlsearch.trial.bundles import DataBundle, DataError, DatasetBundle
from dlsearch.trial.custom_data import load_custom
from dlsearch.trial.data_files import (  # noqa: F401  (check_data_available: re-exported for older callers)
    IDX_DATASETS,
    IDX_FILES,
    absolute,
    cache_dir,
    check_data_available,
    csv_header_problem,
    find_idx_files,
    how_to_fix,
    idx_path,
    n_informative,
    not_found,
    search_roots,
    synthetic_problems,
)

# torchvision's mirrors and the md5 sums it publishes for the gzipped files.
_MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
_GZ_MD5: dict[str, tuple[str, ...]] = {  # in IDX_FILES order
    "mnist": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
              "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
    "fashion_mnist": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                      "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
}
_DOWNLOAD_TIMEOUT_S = 20.0  # per socket operation: an offline machine fails fast instead of hanging a study
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801  # IDX: unsigned bytes, 3 dims / 1 dim
# Fixed seeds, not the study's: the test set and the synthetic problem must not move when the seed does.
_TEST_SPLIT_SEED = 0
_SYNTHETIC_SEED = 0
_MIN_STD = 1e-6
_log = logging.getLogger(__name__)


def load_data(
    spec: DataSpec, seed: int, device: str | torch.device = "cpu", *, base_dir: str | None = None
) -> DataBundle | DatasetBundle:
    """Load, split and normalize the dataset `spec` names, on `device`.

    `seed` drives the `subset` and train/validation split; pass the study's seed so every
    trial sees the same split. The test split never depends on it. Results are cached per
    process (by spec, seed, device and the folders or file the spec resolves to), so many
    trials in one worker share one bundle: the returned tensors must not be modified in place.
    `dataset: custom` calls the user's `data.factory` (looked for in `base_dir`, the study's
    folder, then the working directory) and checks what it returns.
    Raises DataError when the data cannot be had.
    """
    return _load_cached(spec, seed, str(torch.device(device)), _resolution_key(spec, base_dir), base_dir)


def first_samples(data: DataBundle | DatasetBundle, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` samples `(x, y)` of `split` (train, val or test) as tensors, on the CPU."""
    if isinstance(data, DataBundle):
        return getattr(data, f"x_{split}")[:n].cpu(), getattr(data, f"y_{split}")[:n].cpu()
    dataset = getattr(data, split)
    samples = [dataset[i] for i in range(min(n, len(dataset)))]
    x = torch.stack([torch.as_tensor(s[0]) for s in samples]).float()
    return x, torch.as_tensor([int(s[1]) for s in samples], dtype=torch.int64)


def clear_cache() -> None:
    """Forget every bundle `load_data` has cached in this process."""
    _load_cached.cache_clear()


# ---------------------------------------------------------------- building a bundle


@functools.lru_cache(maxsize=4)  # an MNIST bundle is ~220 MB of float32; a worker rarely needs more than one
def _load_cached(
    spec: DataSpec, seed: int, device: str, resolved: tuple[str, ...], base_dir: str | None
) -> DataBundle | DatasetBundle:
    del resolved  # part of the cache key only
    if spec.dataset == "custom":
        return load_custom(spec, seed, base_dir).to(device)
    return _build(spec, seed).to(device)


def _build(spec: DataSpec, seed: int) -> DataBundle:
    if spec.dataset in IDX_DATASETS:
        folder = find_idx_files(spec) or _download(spec)
        x_pool, y_pool, x_test, y_test = _read_idx_folder(folder)
        n_classes = 10
    else:
        x, y, n_classes = {"digits": _digits, "synthetic": _synthetic, "csv": _csv}[spec.dataset](spec)
        x_pool, y_pool, x_test, y_test = _hold_out_test(x, y, spec.test_fraction)
    train_idx, val_idx = _train_val_indices(len(y_pool), spec, seed)
    x_train, x_val = x_pool[train_idx], x_pool[val_idx]
    y_train = y_pool[train_idx]
    if spec.resize is not None or spec.pad:
        x_train, x_val, x_test = (_reshape_images(x, spec.resize, spec.pad) for x in (x_train, x_val, x_test))
    if spec.shuffle_labels:
        # Drawn from the study seed like the split: every trial gets the same wrong labels.
        y_train = y_train[torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))]
    # Images share one mean/std (a pixel is a pixel); tabular columns have their own units.
    mean, std = _train_stats(x_train, per_feature=x_train.dim() == 2)
    for x in (x_train, x_val, x_test):
        x.sub_(mean).div_(std)  # in place: each is a fresh copy made by indexing or reading
    return DataBundle(
        x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_pool[val_idx],
        x_test=x_test, y_test=y_test, input_shape=tuple(x_train.shape[1:]), n_classes=n_classes,
    )


def _reshape_images(x: torch.Tensor, size: int | None, pad: int) -> torch.Tensor:
    """Images `(N, C, H, W)` resized to `size` x `size` (bilinear, antialiased), then `pad` background pixels
    on every side: how 8x8 digits become MNIST-like 28x28 (20x20 ink box, 4 pixels of margin)."""
    if size is not None:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=True)
    if pad:
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=0.0)  # raw pixels: 0 is background
    return x.contiguous()


def _hold_out_test(x: torch.Tensor, y: torch.Tensor, fraction: float) -> tuple[torch.Tensor, ...]:
    """(x_pool, y_pool, x_test, y_test) for datasets without an official test split."""
    order = np.random.default_rng(_TEST_SPLIT_SEED).permutation(len(y))
    n_test = _n_held_out(len(y), fraction, "data.test_fraction")
    test_idx, pool_idx = (torch.from_numpy(np.sort(part)) for part in (order[:n_test], order[n_test:]))
    return x[pool_idx], y[pool_idx], x[test_idx], y[test_idx]


def _train_val_indices(n_pool: int, spec: DataSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the training pool: at most `subset` of them if set, then `val_fraction` of those held out."""
    order = np.random.default_rng(seed % 2**64).permutation(n_pool)  # numpy seeds must be >= 0
    if spec.subset is not None:
        # An upper bound: `--set data.subset=5000` makes any study quick, also one with fewer samples.
        order = order[: spec.subset]
    n_val = _n_held_out(len(order), spec.val_fraction, "data.val_fraction")
    return torch.from_numpy(order[n_val:]), torch.from_numpy(order[:n_val])


def _n_held_out(n: int, fraction: float, field: str) -> int:
    """round(fraction * n), kept so that both sides of the split have at least one sample."""
    if n < 2:
        raise DataError(f"{field}: {n} sample(s) cannot be split in two; use more data")
    return min(max(int(fraction * n + 0.5), 1), n - 1)


def _train_stats(x_train: torch.Tensor, per_feature: bool) -> tuple[torch.Tensor, torch.Tensor]:
    std, mean = torch.std_mean(x_train, dim=0 if per_feature else None, correction=0)
    # A constant training feature would divide val/test values by ~0; leave it unscaled instead.
    return mean, torch.where(std > _MIN_STD, std, torch.ones_like(std))


# ---------------------------------------------------------------- built-in datasets


def _digits(spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor, int]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)  # 1797 8x8 images, pixels 0-16, bundled with scikit-learn
    return torch.from_numpy(x.astype(np.float32)).reshape(-1, 1, 8, 8), torch.from_numpy(y.astype(np.int64)), 10


def _synthetic(spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor, int]:
    problems = synthetic_problems(spec)
    if problems:
        raise DataError(problems[0])
    from sklearn.datasets import make_classification

    informative = n_informative(spec.n_features)
    x, y = make_classification(
        n_samples=spec.n_samples, n_features=spec.n_features, n_informative=informative,
        n_redundant=min(2, spec.n_features - informative),  # sklearn's default 2 does not fit 2-3 features
        n_classes=spec.n_classes, random_state=_SYNTHETIC_SEED,
    )
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)), spec.n_classes


def _csv(spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor, int]:
    problem = csv_header_problem(spec)
    if problem:
        raise DataError(problem)
    import pandas as pd

    try:
        frame = pd.read_csv(spec.path)
    except (ValueError, OSError) as err:  # pandas' ParserError and EmptyDataError are ValueErrors
        raise DataError(f"data.path: cannot read it as CSV: {err} (got {spec.path!r})") from None
    with_gaps = [str(c) for c in frame.columns if frame[c].isna().any()]
    labels = frame.pop(spec.label_column)
    non_numeric = [str(c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    codes, classes = pd.factorize(labels, sort=True)  # sorted unique values -> 0..K-1
    if non_numeric:
        problem = f"every column but data.label_column must be numeric; not numeric: {', '.join(non_numeric)}"
    elif with_gaps:
        problem = f"missing values in columns {', '.join(with_gaps)}"
    elif frame.shape[1] == 0 or len(classes) < 2:
        problem = f"needs a feature column and 2 classes (found {frame.shape[1]} and {len(classes)})"
    else:
        x = torch.from_numpy(frame.to_numpy(dtype=np.float32))
        return x, torch.from_numpy(codes.astype(np.int64)), len(classes)
    raise DataError(f"data.path: {problem} (got {spec.path!r})")


# ---------------------------------------------------------------- IDX files (MNIST, Fashion-MNIST)


def _read_idx_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images float32 in [0, 1] shaped (N, 1, rows, cols)."""
    out: list[torch.Tensor] = []
    for prefix in ("train", "t10k"):
        images_path = idx_path(folder, f"{prefix}-images-idx3-ubyte")
        labels_path = idx_path(folder, f"{prefix}-labels-idx1-ubyte")
        assert images_path and labels_path, "callers pass a folder find_idx_files accepted"
        images, labels = _read_idx(images_path, _IMAGES_MAGIC), _read_idx(labels_path, _LABELS_MAGIC)
        if len(images) != len(labels):
            raise DataError(f"{folder}: {images_path.name} holds {len(images)} images but {labels_path.name} "
                            f"holds {len(labels)} labels")
        if labels.size and labels.max() > 9:
            raise DataError(f"{labels_path}: labels must be 0-9 (found {labels.max()})")
        if out and images.shape[1:] != tuple(out[0].shape[2:]):
            raise DataError(f"{images_path}: images are {images.shape[1:]}, the training images "
                            f"{tuple(out[0].shape[2:])}")
        x = torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)  # astype copies: writable
        out += [x, torch.from_numpy(labels.astype(np.int64))]
    return out[0], out[1], out[2], out[3]


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array stored in one IDX file, plain or gzipped; DataError naming the file otherwise."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror})") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:  # bad header, truncated stream, corrupt data
            raise DataError(f"{path}: not a valid gzip file ({err}); delete it and fetch it again") from None
    kind = "images" if magic == _IMAGES_MAGIC else "labels"
    n_dims = magic & 0xFF
    header_bytes = 4 + 4 * n_dims
    if len(raw) < header_bytes:
        raise DataError(f"{path}: truncated: {len(raw)} bytes, shorter than an IDX {kind} header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        hint = "; it looks gzipped: name it .gz" if raw[:2] == b"\x1f\x8b" else ""
        raise DataError(f"{path}: wrong magic number 0x{found:08X}; IDX {kind} files start with 0x{magic:08X}{hint}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=n_dims, offset=4))
    n_bytes = int(np.prod(dims))
    if len(raw) - header_bytes != n_bytes:
        what = "truncated" if len(raw) - header_bytes < n_bytes else "too long"
        raise DataError(f"{path}: {what}: the header promises {'x'.join(map(str, dims))} = {n_bytes} bytes of "
                        f"{kind}, the file holds {len(raw) - header_bytes}")
    return np.frombuffer(raw, dtype=np.uint8, count=n_bytes, offset=header_bytes).reshape(dims)


def _download(spec: DataSpec) -> Path:
    """Fetch the missing gz files into the cache folder and return it, or raise one clear DataError."""
    if not spec.download:
        raise DataError(f"data.root: {not_found(spec)}; data.download is false. {how_to_fix(spec)}")
    target, looked = cache_dir(spec.dataset), not_found(spec)  # described before the download creates folders
    failure = _fetch_missing(spec.dataset, target)
    if failure:
        raise DataError(f"data.root: {looked}; downloading into {target} failed: {failure}. "
                        f"{how_to_fix(spec)}")
    return target


def _fetch_missing(dataset: str, target: Path) -> str | None:
    """Download each file `target` lacks, trying the mirrors in order; why it failed, or None.

    A download that fails leaves nothing behind: the folders it made for `target` are removed
    again when they are still empty (no empty cache folder from a machine without network).
    """
    made = [p for p in (target, *target.parents) if not p.exists()]  # deepest first
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create the folder ({err.strerror})"
    failure = _fetch_each(dataset, target)
    if failure:
        for folder in made:
            with contextlib.suppress(OSError):  # not empty (another process's files): kept
                folder.rmdir()
    return failure


def _fetch_each(dataset: str, target: Path) -> str | None:
    for name, md5 in zip(IDX_FILES, _GZ_MD5[dataset], strict=True):
        if idx_path(target, name):
            continue
        reasons = []
        for mirror in _MIRRORS[dataset]:
            url = f"{mirror}{name}.gz"
            try:
                _fetch(url, target / f"{name}.gz", md5)
                break
            except (OSError, ValueError, http.client.HTTPException) as err:  # URLError and timeouts are OSErrors
                reasons.append(f"{url}: {_reason(err)}")
        else:
            return "; ".join(reasons)  # the next files would fail the same way
    return None


def _fetch(url: str, dest: Path, md5: str) -> None:
    """Download `url` to `dest` atomically (temp file + rename) after checking its md5."""
    _log.info("downloading %s to %s", url, dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    digest = hashlib.md5(usedforsecurity=False)  # integrity against a published sum, not security
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise ValueError(f"checksum mismatch (md5 {digest.hexdigest()}, expected {md5})")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    return str(getattr(err, "reason", None) or err) or type(err).__name__


def _resolution_key(spec: DataSpec, base_dir: str | None = None) -> tuple[str, ...]:
    # The same spec names other files when the working directory or the environment changes.
    if spec.dataset in IDX_DATASETS:
        return tuple(map(str, search_roots(spec)))
    if spec.dataset == "csv" and spec.path:
        return (str(absolute(spec.path)),)
    if spec.dataset == "custom":
        return (os.getcwd(),)  # with base_dir (also in the key), where the factory's module is found
    return ()
