"""Tests for dlsearch.trial.data: IDX parsing, file lookup and download, splits, normalization, cache.

Every test runs with XDG_CACHE_HOME in a tmp folder, DLSEARCH_DATA_DIR unset and the
download mirrors pointed at http://127.0.0.1:9/ (the discard port, where nothing listens),
so no test reads the user's cache or touches the network. Real MNIST is used only where
the shared copy exists (../shared/data from the repository root).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dlsearch.trial import data
from dlsearch.trial.bundles import _TENSOR_FIELDS
from dlsearch.trial.data import DataError, load_data
from dlsearch.trial.data_files import IDX_FILES, check_data_available, find_idx_files, search_roots
from dlsearch.config.spec import DataSpec

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
UNREACHABLE = "http://127.0.0.1:9/"  # nothing listens on the discard port: connections are refused at once


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A private cache folder, no DLSEARCH_DATA_DIR, unreachable mirrors and an empty load_data cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DLSEARCH_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "_MIRRORS", {"mnist": (UNREACHABLE,), "fashion_mnist": (UNREACHABLE,)})
    data.clear_cache()
    yield tmp_path / "xdg"
    data.clear_cache()


# ---------------------------------------------------------------- helpers


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, n_train: int = 40, n_test: int = 12, gz: bool = False,
                shape: tuple[int, int] = (5, 3)) -> dict[str, np.ndarray]:
    """Four small IDX files; pixel [0, 0] of image i is i, so a sample can be traced through the splits."""
    rng = np.random.default_rng(n_train)
    arrays: dict[str, np.ndarray] = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)
        arrays[f"{prefix}-images-idx3-ubyte"] = images
        arrays[f"{prefix}-labels-idx1-ubyte"] = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        payload = idx_bytes(0x803 if array.ndim == 3 else 0x801, array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / name).write_bytes(payload)
    return arrays


def affine_fit(normalized: torch.Tensor, raw: np.ndarray) -> tuple[float, float, float]:
    """(a, b, max residual) of normalized = a * raw + b by least squares."""
    x, y = raw.astype(np.float64).ravel(), normalized.double().numpy().ravel()
    a, b = np.polyfit(x, y, 1)
    return a, b, float(np.abs(a * x + b - y).max())


# ---------------------------------------------------------------- IDX files


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist(tmp_path / "m", gz=gz)
    bundle = load_data(DataSpec(dataset="mnist", root=str(tmp_path / "m"), download=False), seed=0)

    assert bundle.input_shape == (1, 5, 3) and bundle.n_classes == 10
    assert bundle.x_train.dtype == torch.float32 and bundle.y_train.dtype == torch.int64
    assert (len(bundle.y_train), len(bundle.y_val), len(bundle.y_test)) == (36, 4, 12)
    # The official test split keeps its order; its pixels are an increasing affine image of the file's bytes.
    test_images = arrays["t10k-images-idx3-ubyte"]
    assert torch.equal(bundle.y_test, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"].astype(np.int64)))
    a, b, residual = affine_fit(bundle.x_test, test_images)
    assert a > 0 and residual < 1e-4
    # Undo the same normalization on train + val: every training image comes back with its own label.
    pool_x = torch.cat([bundle.x_train, bundle.x_val]).double().numpy()
    pool_y = torch.cat([bundle.y_train, bundle.y_val]).numpy()
    raw = np.rint((pool_x - b) / a).astype(np.int64)[:, 0]
    index = raw[:, 0, 0]
    assert sorted(index) == list(range(40))
    np.testing.assert_array_equal(raw, arrays["train-images-idx3-ubyte"][index])
    np.testing.assert_array_equal(pool_y, arrays["train-labels-idx1-ubyte"][index])


def corrupt_truncate(folder: Path) -> tuple[str, str]:
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    return path.name, "truncated"


def corrupt_magic(folder: Path) -> tuple[str, str]:
    path = folder / "t10k-labels-idx1-ubyte"
    path.write_bytes(struct.pack(">I", 0x803) + path.read_bytes()[4:])
    return path.name, "wrong magic number 0x00000803"


def corrupt_short_header(folder: Path) -> tuple[str, str]:
    path = folder / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00")
    return path.name, "truncated"


def corrupt_gzip(folder: Path) -> tuple[str, str]:
    path = folder / "train-images-idx3-ubyte"
    gz = path.with_name(path.name + ".gz")
    gz.write_bytes(gzip.compress(path.read_bytes())[:-40])  # cut before the end-of-stream marker
    path.unlink()
    return gz.name, "not a valid gzip file"


def corrupt_gzipped_without_gz_name(folder: Path) -> tuple[str, str]:
    path = folder / "train-labels-idx1-ubyte"
    path.write_bytes(gzip.compress(path.read_bytes()))
    return path.name, "it looks gzipped: name it .gz"


def corrupt_not_gzip(folder: Path) -> tuple[str, str]:
    path = folder / "t10k-images-idx3-ubyte"
    path.rename(path.with_name(path.name + ".gz"))  # plain bytes under a .gz name
    return path.name + ".gz", "not a valid gzip file"


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_magic, corrupt_short_header, corrupt_gzip,
                                     corrupt_not_gzip, corrupt_gzipped_without_gz_name])
def test_corrupt_idx_file_names_the_file_and_the_fault(
    tmp_path: Path, corrupt: Callable[[Path], tuple[str, str]]
) -> None:
    write_mnist(tmp_path / "m")
    name, fault = corrupt(tmp_path / "m")
    with pytest.raises(DataError) as err:
        load_data(DataSpec(dataset="mnist", root=str(tmp_path / "m"), download=False), seed=0)
    assert str(tmp_path / "m" / name) in str(err.value) and fault in str(err.value)


def test_label_count_mismatch_is_a_data_error(tmp_path: Path) -> None:
    write_mnist(tmp_path / "m")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(0x801, np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match="holds 12 images but t10k-labels-idx1-ubyte holds 3 labels"):
        load_data(DataSpec(dataset="mnist", root=str(tmp_path / "m")), seed=0)


# ---------------------------------------------------------------- lookup and download


def test_lookup_order_root_then_env_then_cache(
    tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DLSEARCH_DATA_DIR", str(tmp_path / "env"))
    root, env, cache = tmp_path / "root", tmp_path / "env" / "mnist", isolated / "dlsearch" / "mnist"
    spec = DataSpec(dataset="mnist", root="root")  # relative: resolved against the working directory
    assert search_roots(spec) == [root, env, cache]

    for folder, n_train in ((cache, 10), (env, 20), (root, 30)):
        write_mnist(folder, n_train=n_train)
    assert find_idx_files(spec) == root
    bundle = load_data(spec, seed=0)
    assert len(bundle.y_train) + len(bundle.y_val) == 30

    (root / "t10k-labels-idx1-ubyte").unlink()  # three of four files is not enough
    assert find_idx_files(spec) == env
    assert find_idx_files(DataSpec(dataset="mnist")) == env
    monkeypatch.delenv("DLSEARCH_DATA_DIR")
    assert find_idx_files(spec) == cache
    assert search_roots(DataSpec(dataset="digits")) == [] and find_idx_files(DataSpec(dataset="digits")) is None


def test_not_found_lists_every_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLSEARCH_DATA_DIR", str(tmp_path / "env"))
    write_mnist(tmp_path / "root", n_train=5)
    (tmp_path / "root" / "train-images-idx3-ubyte").unlink()
    spec = DataSpec(dataset="mnist", root=str(tmp_path / "root"), download=False)
    with pytest.raises(DataError) as err:
        load_data(spec, seed=0)
    message = str(err.value)
    assert message.startswith("data.root: MNIST files not found; looked in ")
    for folder in search_roots(spec):
        assert str(folder) in message
    assert "(missing train-images-idx3-ubyte)" in message and "(no such folder)" in message
    assert "data.download is false" in message and "DLSEARCH_DATA_DIR" in message and "\n" not in message
    assert check_data_available(spec) == [message]
    # With downloads allowed, validate has nothing to say: the run fetches the files.
    assert check_data_available(DataSpec(dataset="mnist", root=str(tmp_path / "root"))) == []


def test_download_failure_is_one_clear_message(tmp_path: Path, isolated: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The mirrors point at UNREACHABLE (see the `isolated` fixture): the connection is refused.
    monkeypatch.setenv("DLSEARCH_DATA_DIR", str(tmp_path / "env"))
    spec = DataSpec(dataset="fashion_mnist")
    with pytest.raises(DataError) as err:
        load_data(spec, seed=0)
    message = str(err.value)
    cache = isolated / "dlsearch" / "fashion_mnist"
    assert message.startswith("data.root: Fashion-MNIST files not found; looked in ")
    assert str(tmp_path / "env" / "fashion_mnist") in message and str(cache) in message
    assert f"downloading into {cache} failed: {UNREACHABLE}train-images-idx3-ubyte.gz: " in message
    assert "Set data.root" in message and "DLSEARCH_DATA_DIR" in message
    assert not cache.exists()  # no partial file left behind, nor the empty folder the download made


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # no request log in the test output


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server over a folder; yields (url, folder)."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", folder
    server.shutdown()
    server.server_close()


def test_download_verifies_md5_and_falls_back_to_the_next_mirror(
    isolated: Path, monkeypatch: pytest.MonkeyPatch, mirror: tuple[str, Path]
) -> None:
    url, served = mirror
    write_mnist(served, n_train=20, gz=True)
    md5s = tuple(hashlib.md5((served / f"{name}.gz").read_bytes()).hexdigest() for name in IDX_FILES)
    monkeypatch.setattr(data, "_MIRRORS", {"mnist": (UNREACHABLE, url)})
    monkeypatch.setattr(data, "_GZ_MD5", {"mnist": md5s})
    cache = isolated / "dlsearch" / "mnist"

    bundle = load_data(DataSpec(dataset="mnist"), seed=0)
    assert len(bundle.y_train) + len(bundle.y_val) == 20
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{name}.gz" for name in IDX_FILES)

    monkeypatch.setattr(data, "_GZ_MD5", {"fashion_mnist": ("0" * 32,) * 4})
    monkeypatch.setattr(data, "_MIRRORS", {"fashion_mnist": (url,)})
    with pytest.raises(DataError, match="checksum mismatch"):
        load_data(DataSpec(dataset="fashion_mnist"), seed=0)
    assert not (isolated / "dlsearch" / "fashion_mnist").exists()  # no partial file, no empty folder


def test_no_download_when_the_files_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist(tmp_path / "m")
    monkeypatch.setattr(data, "_fetch", lambda *args: pytest.fail("downloaded although the files exist"))
    load_data(DataSpec(dataset="mnist", root=str(tmp_path / "m")), seed=0)


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="no shared MNIST copy at ../shared/data")
def test_real_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLSEARCH_DATA_DIR", str(SHARED_DATA))
    spec = DataSpec(dataset="mnist", download=False)
    assert find_idx_files(spec) == SHARED_DATA / "mnist"
    x_train, y_train, x_test, y_test = data._read_idx_folder(SHARED_DATA / "mnist")
    assert x_train.shape == (60_000, 1, 28, 28) and x_test.shape == (10_000, 1, 28, 28)
    assert float(x_train.min()) >= 0.0 and float(x_train.max()) == 1.0
    assert torch.bincount(y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

    bundle = load_data(spec, seed=0)
    assert (len(bundle.y_train), len(bundle.y_val), len(bundle.y_test)) == (54_000, 6_000, 10_000)
    assert bundle.input_shape == (1, 28, 28) and bundle.n_classes == 10
    assert torch.equal(bundle.y_test, y_test)
    assert abs(float(bundle.x_train.mean())) < 1e-4 and abs(float(bundle.x_train.std()) - 1) < 1e-3


# ---------------------------------------------------------------- splits and normalization


def test_digits_shapes_and_train_only_normalization() -> None:
    bundle = load_data(DataSpec(dataset="digits"), seed=1)
    # 1797 digits: 359 held out as test (0.2), then 144 of the 1438 left as validation (0.1).
    assert (len(bundle.y_train), len(bundle.y_val), len(bundle.y_test)) == (1294, 144, 359)
    assert bundle.x_train.shape == (1294, 1, 8, 8) and bundle.input_shape == (1, 8, 8)
    assert bundle.n_classes == 10 and set(bundle.y_train.tolist()) == set(range(10))
    # One global mean/std from the training split: exact there, only close elsewhere.
    std, mean = torch.std_mean(bundle.x_train, correction=0)
    assert abs(float(mean)) < 1e-5 and abs(float(std) - 1) < 1e-5
    assert abs(float(bundle.x_val.mean())) > 1e-4 and abs(float(bundle.x_test.mean())) > 1e-4


def test_stats_come_from_the_training_split_only() -> None:
    train = torch.tensor([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]])
    mean, std = data._train_stats(train, per_feature=True)
    torch.testing.assert_close(mean, torch.tensor([2.0, 5.0]))
    # The constant column keeps a std of 1 so that val/test values are not blown up.
    torch.testing.assert_close(std, torch.tensor([(8 / 3) ** 0.5, 1.0]))
    mean, std = data._train_stats(train, per_feature=False)
    assert mean.shape == () and float(mean) == pytest.approx(3.5)


def test_subset() -> None:
    bundle = load_data(DataSpec(dataset="digits", subset=100), seed=3)
    assert (len(bundle.y_train), len(bundle.y_val), len(bundle.y_test)) == (90, 10, 359)
    everything = load_data(DataSpec(dataset="digits", subset=5000), seed=3)  # more than there is: all of it
    assert len(everything.y_train) + len(everything.y_val) == 1438


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_seeds_move_train_and_val_but_never_test(dataset: str) -> None:
    spec = DataSpec(dataset=dataset)
    first = load_data(spec, seed=7)
    data.clear_cache()
    again = load_data(spec, seed=7)
    other = load_data(spec, seed=8)
    assert first is not again
    for name in _TENSOR_FIELDS:
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.y_val, other.y_val)
    assert torch.equal(first.y_test, other.y_test)
    # The test rows are the same samples; their normalization may differ with the training split.
    assert first.x_test.shape == other.x_test.shape


def test_synthetic_shapes_and_rules() -> None:
    bundle = load_data(DataSpec(dataset="synthetic", n_samples=500, n_features=6, n_classes=3), seed=0)
    assert (len(bundle.y_train), len(bundle.y_val), len(bundle.y_test)) == (360, 40, 100)
    assert bundle.input_shape == (6,) and bundle.n_classes == 3
    assert set(torch.cat([bundle.y_train, bundle.y_test]).tolist()) == {0, 1, 2}
    std, mean = torch.std_mean(bundle.x_train, dim=0, correction=0)  # per feature
    torch.testing.assert_close(mean, torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(6), atol=1e-5, rtol=0)

    too_few = DataSpec(dataset="synthetic", n_features=1)
    assert check_data_available(too_few) == ["data.n_features: must be >= 2 for dataset synthetic (got 1)"]
    too_many = DataSpec(dataset="synthetic", n_features=3, n_classes=3)
    [line] = check_data_available(too_many)
    assert line.startswith("data.n_classes: must be <= 2 with n_features 3") and line.endswith("(got 3)")
    with pytest.raises(DataError, match="data.n_classes"):
        load_data(too_many, seed=0)


# ---------------------------------------------------------------- csv


def write_csv(path: Path, extra: str = "") -> None:
    names = ["dog"] * 15 + ["bird"] * 5 + ["cat"] * 10
    lines = ["f1,label,f2" + (",color" if extra else "")]
    lines += [f"{i},{name},{i % 4 * 0.5}" + (f",{extra}" if extra else "") for i, name in enumerate(names)]
    path.write_text("\n".join(lines) + "\n")


def test_csv_with_string_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "pets.csv")
    spec = DataSpec(dataset="csv", path="pets.csv")
    assert check_data_available(spec) == []
    bundle = load_data(spec, seed=0)
    assert bundle.input_shape == (2,) and bundle.n_classes == 3
    assert (len(bundle.y_train), len(bundle.y_val), len(bundle.y_test)) == (22, 2, 6)
    labels = torch.cat([bundle.y_train, bundle.y_val, bundle.y_test])
    assert torch.bincount(labels).tolist() == [5, 10, 15]  # sorted: bird, cat, dog


def test_csv_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert check_data_available(DataSpec(dataset="csv", path="x.csv")) == ["data.path: no such file (got 'x.csv')"]
    with pytest.raises(DataError, match=r"^data.path: no such file \(got 'x.csv'\)$"):
        load_data(DataSpec(dataset="csv", path="x.csv"), seed=0)

    write_csv(tmp_path / "pets.csv")
    no_label = DataSpec(dataset="csv", path="pets.csv", label_column="species")
    [line] = check_data_available(no_label)
    assert line == "data.label_column: no such column in pets.csv; its columns are f1, label, f2 (got 'species')"
    with pytest.raises(DataError, match="data.label_column: no such column"):
        load_data(no_label, seed=0)

    write_csv(tmp_path / "colors.csv", extra="red")
    spec = DataSpec(dataset="csv", path="colors.csv")
    assert check_data_available(spec) == []  # validate reads the header only
    with pytest.raises(DataError) as err:
        load_data(spec, seed=0)
    assert str(err.value) == ("data.path: every column but data.label_column must be numeric; "
                              "not numeric: color (got 'colors.csv')")

    (tmp_path / "gaps.csv").write_text("a,label\n1,x\n,y\n3,\n4,x\n")
    with pytest.raises(DataError, match=r"missing values in columns a, label \(got 'gaps.csv'\)"):
        load_data(DataSpec(dataset="csv", path="gaps.csv"), seed=0)


# ---------------------------------------------------------------- cache and devices


def test_cache_returns_the_same_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = DataSpec(dataset="digits")
    bundle = load_data(spec, seed=0)
    assert load_data(DataSpec(dataset="digits"), seed=0, device=torch.device("cpu")) is bundle
    assert load_data(spec, seed=1) is not bundle
    assert bundle.to("cpu") is bundle

    # The same spec naming other folders (another DLSEARCH_DATA_DIR) is another cache entry.
    for name, n_train in (("a", 10), ("b", 20)):
        write_mnist(tmp_path / name / "mnist", n_train=n_train)
    mnist = DataSpec(dataset="mnist")
    sizes = []
    for name in ("a", "b"):
        monkeypatch.setenv("DLSEARCH_DATA_DIR", str(tmp_path / name))
        bundle = load_data(mnist, seed=0)
        sizes.append(len(bundle.y_train) + len(bundle.y_val))
    assert sizes == [10, 20]


def test_to_moves_every_tensor() -> None:
    bundle = load_data(DataSpec(dataset="digits"), seed=0)
    moved = bundle.to("meta")  # a device every machine has
    assert moved is not bundle and moved.n_classes == bundle.n_classes
    assert all(getattr(moved, name).device.type == "meta" for name in _TENSOR_FIELDS)


def test_custom_factory_that_cannot_be_imported_is_a_data_error_naming_the_key() -> None:
    # Custom data is the factory's (tests/test_custom.py); validate checks the entry point, not the data.
    with pytest.raises(DataError, match=r"^data.factory: cannot import 'my.data': ModuleNotFoundError"):
        load_data(DataSpec(dataset="custom", factory="my.data:load"), seed=0)
    assert check_data_available(DataSpec(dataset="custom", factory="my.data:load")) == []
