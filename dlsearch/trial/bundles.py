"""What a dataset becomes for a trial: its splits as tensors on a device, or as torch Datasets."""

from __future__ import annotations

import dataclasses

import torch

from dlsearch.errors import InputError

_TENSOR_FIELDS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


class DataError(InputError):
    """The data cannot be found, downloaded or read; the message says what and how to fix it."""

    key = "data"


@dataclasses.dataclass(frozen=True, eq=False)
class DataBundle:
    """Train / validation / test splits of one dataset, all on one device.

    Features are float32 with shape (N, *input_shape); labels are int64 in [0, n_classes).
    Shared between trials through `load_data`'s cache: never modify the tensors in place.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_shape: tuple[int, ...]  # per sample: (1, 28, 28) for MNIST, (n_features,) for tabular data
    n_classes: int

    def to(self, device: torch.device | str) -> DataBundle:
        """The bundle with every tensor on `device`; `self` when they already are there."""
        moved = {name: getattr(self, name).to(device) for name in _TENSOR_FIELDS}
        if all(moved[name] is getattr(self, name) for name in _TENSOR_FIELDS):
            return self  # Tensor.to returns the tensor itself when nothing changes
        return dataclasses.replace(self, **moved)


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetBundle:
    """Train / validation / test splits as map-style torch Datasets of `(x, y)` samples.

    For data too large for memory: the training loop reads it in `DataLoader` batches
    (`data.n_workers` loader processes, pinned memory on CUDA) instead of keeping whole
    splits on the device. `x` is one sample of shape `input_shape`; `y` its class index.
    """

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    input_shape: tuple[int, ...]
    n_classes: int

    def to(self, device: torch.device | str) -> DatasetBundle:
        """`self`: batches move to the device as they are read."""
        return self
