"""Where a dataset's files are, and what is wrong with them, without torch: what `dlsearch validate` asks.

`search_roots` and `find_idx_files` say where MNIST-style IDX files are looked for and
found; `check_data_available` lists a study's data problems without downloading or writing
anything. `dlsearch.trial.data` loads from the same places. Only the standard library is
imported here (pandas only to read a CSV file's header), so the commands that run no trial
stay quick.
"""

from __future__ import annotations

import os
from pathlib import Path

from dlsearch.config.spec import DataSpec

IDX_DATASETS = ("mnist", "fashion_mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_DISPLAY_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def search_roots(spec: DataSpec) -> list[Path]:
    """The folders searched for MNIST-style IDX files, in order; [] for other datasets.

    `data.root` (relative to the working directory), then `$DLSEARCH_DATA_DIR/<dataset>`,
    then the user cache `$XDG_CACHE_HOME/dlsearch/<dataset>` (default `~/.cache`), which is
    also where downloads go.
    """
    if spec.dataset not in IDX_DATASETS:
        return []
    roots = []
    if spec.root:
        roots.append(absolute(spec.root))
    if os.environ.get("DLSEARCH_DATA_DIR"):
        roots.append(absolute(os.environ["DLSEARCH_DATA_DIR"]) / spec.dataset)
    roots.append(cache_dir(spec.dataset))
    return list(dict.fromkeys(roots))  # the same folder twice is searched once


def find_idx_files(spec: DataSpec) -> Path | None:
    """The first folder of `search_roots` holding all four IDX files (each plain or .gz), or None."""
    for folder in search_roots(spec):
        if all(idx_path(folder, name) for name in IDX_FILES):
            return folder
    return None


def check_data_available(spec: DataSpec) -> list[str]:
    """Problems with the data as `data.<field>: message` lines; never downloads or writes.

    Missing MNIST files are a problem only when `data.download` is false (a run would fetch them).
    """
    if spec.dataset in IDX_DATASETS:
        if find_idx_files(spec) is None and not spec.download:
            return [f"data.root: {not_found(spec)}; data.download is false. {how_to_fix(spec)}"]
        return []
    if spec.dataset == "csv":
        problem = csv_header_problem(spec)
        return [problem] if problem else []
    if spec.dataset == "synthetic":
        return synthetic_problems(spec)
    return []


def idx_path(folder: Path, name: str) -> Path | None:
    """`folder/name` or `folder/name.gz`, whichever is a file (plain first), or None."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def not_found(spec: DataSpec) -> str:
    """'MNIST files not found; looked in A (why), B (why)' over every folder of `search_roots`."""
    looked = []
    for folder in search_roots(spec):
        missing = [name for name in IDX_FILES if not idx_path(folder, name)]
        why = ("no such folder" if not folder.is_dir() else
               "none of the 4 files" if len(missing) == len(IDX_FILES) else f"missing {', '.join(missing)}")
        looked.append(f"{folder} ({why})")
    return f"{_DISPLAY_NAMES[spec.dataset]} files not found; looked in {', '.join(looked)}"


def how_to_fix(spec: DataSpec) -> str:
    return (f"Set data.root to a folder holding {', '.join(IDX_FILES)} (each plain or .gz), or "
            f"DLSEARCH_DATA_DIR to a folder with a {spec.dataset}/ subfolder holding them")


def csv_header_problem(spec: DataSpec) -> str | None:
    """The first problem with a CSV dataset seen without reading past the header, or None."""
    if not spec.path:
        return "data.path: is required for dataset csv (the CSV file)"
    if not Path(spec.path).is_file():
        return f"data.path: {'not a file' if Path(spec.path).exists() else 'no such file'} (got {spec.path!r})"
    import pandas as pd  # ~0.5 s to import: only a csv dataset pays it

    try:
        columns = [str(c) for c in pd.read_csv(spec.path, nrows=0).columns]
    except (ValueError, OSError) as err:
        return f"data.path: cannot read it as CSV: {err} (got {spec.path!r})"
    if spec.label_column not in columns:
        return (f"data.label_column: no such column in {spec.path}; its columns are {', '.join(columns)} "
                f"(got {spec.label_column!r})")
    return None


def synthetic_problems(spec: DataSpec) -> list[str]:
    """Why scikit-learn's `make_classification` cannot make this synthetic problem, or []."""
    if spec.n_features < 2:
        return [f"data.n_features: must be >= 2 for dataset synthetic (got {spec.n_features})"]
    informative = n_informative(spec.n_features)
    if spec.n_classes * 2 > 2**informative:  # make_classification puts 2 clusters per class on hypercube corners
        return [f"data.n_classes: must be <= {2 ** informative // 2} with n_features {spec.n_features} "
                f"({informative} informative features) (got {spec.n_classes})"]
    return []


def n_informative(n_features: int) -> int:
    """How many of a synthetic problem's features carry information (the rest are redundant or noise)."""
    return max(2, n_features // 2)


def cache_dir(dataset: str) -> Path:
    """The user cache folder of `dataset`, where downloads go: `$XDG_CACHE_HOME/dlsearch/<dataset>`."""
    return absolute(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dlsearch" / dataset


def absolute(path: str | Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path)))  # abspath also folds `..` for readable messages
