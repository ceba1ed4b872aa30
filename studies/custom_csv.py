"""A dataset of your own, for studies/custom_csv.yaml: CSV rows read from disk as they are needed.

dlsearch calls `load(data, seed)` once per worker process (the result is cached):

- `data` is the study's `data:` section as a plain dict, with this trial's sampled
  values merged in: the built-in keys this file reuses (`path`, `label_column`,
  `val_fraction`, `test_fraction`, `subset`) and its own (`normalize`);
- `seed` is the study's seed: every trial gets the same split.

It returns the three splits as torch `Dataset`s plus the class count. Each Dataset
keeps only the byte offset of its rows and reads a row when the training loop asks
for it, which is how a file larger than memory is used: dlsearch reads Datasets
through a `DataLoader` (`data.n_workers` loader processes, pinned memory on a GPU).
A factory may return tensors instead, `(x, y)` per split, for data that fits in
memory: dlsearch then keeps each split whole on the device (its fastest path).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

HERE = Path(__file__).resolve().parent  # relative paths are taken from this file's folder, wherever trials run
TEST_SEED = 0  # the test rows never depend on the study's seed


def load(data: dict[str, Any], seed: int) -> dict[str, Any]:
    path = HERE / data["path"]
    offsets, labels, header = _index(path, data["label_column"])
    classes = sorted(set(labels))
    y = np.array([classes.index(label) for label in labels], dtype=np.int64)

    # test: a fixed share of the rows; then val_fraction of the rest (study seed), then the subset.
    order = np.random.default_rng(TEST_SEED).permutation(len(y))
    n_test = max(1, round(data["test_fraction"] * len(y)))
    test, pool = order[:n_test], np.random.default_rng(seed).permutation(order[n_test:])
    if data["subset"]:
        pool = pool[: data["subset"]]
    n_val = max(1, round(data["val_fraction"] * len(pool)))
    val, train = pool[:n_val], pool[n_val:]

    label_index = header.index(data["label_column"])
    scale = _stats(path, offsets[train], label_index) if data["normalize"] else None  # training rows only

    def split(rows: np.ndarray) -> CsvRows:
        return CsvRows(path, offsets[rows], y[rows], label_index, classes, scale)

    return {"train": split(train), "val": split(val), "test": split(test), "n_classes": len(classes)}


class CsvRows(Dataset):
    """Rows of one CSV file, read on demand: item i is (features as float32, class index)."""

    def __init__(self, path: Path, offsets: np.ndarray, labels: np.ndarray, label_index: int,
                 classes: list[str], scale: tuple[torch.Tensor, torch.Tensor] | None):
        self.path, self.offsets, self.labels = path, offsets, labels
        self.label_index, self.classes, self.scale = label_index, classes, scale
        self._file: io.BufferedReader | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = _features(self._handle(), int(self.offsets[i]), self.label_index)
        if self.scale is not None:
            x = (x - self.scale[0]) / self.scale[1]
        return x, int(self.labels[i])

    def _handle(self) -> io.BufferedReader:
        # One open file per process: a DataLoader worker must not share the parent's file position.
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115 - kept open while used
        return self._file

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_pid": -1}  # an open file cannot be pickled to a worker


def _index(path: Path, label_column: str) -> tuple[np.ndarray, list[str], list[str]]:
    """One pass over the file: the byte offset and the label of every data row, and the header."""
    offsets, labels = [], []
    with open(path, "rb") as f:
        header = next(csv.reader([f.readline().decode()]))
        if label_column not in header:
            raise ValueError(f"data.label_column: no column {label_column!r} in {path} (columns: {', '.join(header)})")
        column = header.index(label_column)
        while True:
            offset, line = f.tell(), f.readline()
            if not line:
                break
            if line.strip():
                offsets.append(offset)
                labels.append(next(csv.reader([line.decode()]))[column])
    return np.array(offsets, dtype=np.int64), labels, header


def _features(f: io.BufferedReader, offset: int, label_index: int) -> torch.Tensor:
    f.seek(offset)
    values = next(csv.reader([f.readline().decode()]))
    return torch.tensor([float(v) for j, v in enumerate(values) if j != label_index], dtype=torch.float32)


def _stats(path: Path, offsets: np.ndarray, label_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and std over the given rows, streamed (one row in memory at a time)."""
    n, total, squares = 0, 0.0, 0.0
    with open(path, "rb") as f:
        for offset in offsets:
            x = _features(f, int(offset), label_index).double()
            n, total, squares = n + 1, total + x, squares + x * x
    mean = total / n
    std = (squares / n - mean * mean).clamp_min(0).sqrt()
    return mean.float(), torch.where(std > 1e-6, std, torch.ones_like(std)).float()
