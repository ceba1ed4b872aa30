"""Data from the user's `data.factory`: what it returns, checked and turned into a bundle.

Contract: the factory is called as `factory(data_section, seed)`. `data_section` is the
study's `data:` section as a plain dict (its own keys included, sampled values merged in);
`seed` is the study's seed, so that every trial sees the same split. It returns the three
splits, either as a sequence `(train, val, test)` or as a mapping
`{"train": ..., "val": ..., "test": ..., "n_classes": K}` (`n_classes` optional). Each split is

- an `(x, y)` pair of tensors or numpy arrays: `x` of shape `(N, *input_shape)`, `y` of
  shape `(N,)` holding class indices; or
- a map-style `torch.utils.data.Dataset` whose items are `(x, y)` samples.

When every split is a pair, the result is a `DataBundle` (the in-memory fast path: whole
splits on the device, batches by indexing). When any split is a Dataset, the result is a
`DatasetBundle`, read in `DataLoader` batches; pairs among its splits become
`TensorDataset`s. Features become float32, labels int64. `n_classes` is the one returned,
else the training Dataset's `classes` (torchvision's convention), else for tensors the
largest label + 1.

dlsearch does not normalize, subset or split custom data: the factory returns it as the
model should see it (the section carries `subset` and `val_fraction` for it to honour).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from dlsearch.trial.bundles import DataBundle, DataError, DatasetBundle
from dlsearch.config.entrypoints import EntryPointError, resolve
from dlsearch.config.spec import DataSpec

SPLITS = ("train", "val", "test")
_KEY = "data.factory"


def load_custom(spec: DataSpec, seed: int, base_dir: str | None = None) -> DataBundle | DatasetBundle:
    """Call the study's data factory and check its splits; DataError naming data.factory otherwise."""
    try:
        factory = resolve(spec.factory or "", _KEY, base_dir)
    except EntryPointError as err:
        raise DataError(str(err)) from None
    returned = factory(spec.model_dump(), seed)
    splits, n_classes = _splits(returned)
    if all(isinstance(s, tuple) for s in splits.values()):
        return _tensor_bundle(splits, n_classes)
    return _dataset_bundle(splits, n_classes)


# ---------------------------------------------------------------- helpers


def _splits(returned: Any) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor] | Dataset], int | None]:
    """{split: (x, y) tensors or a Dataset} and the n_classes the factory gave (or None)."""
    shape = ('must return (train, val, test) or {"train": ..., "val": ..., "test": ..., "n_classes": K}, '
             "each split an (x, y) pair of tensors or a torch Dataset")
    n_classes = None
    if isinstance(returned, Mapping):
        missing = [s for s in SPLITS if s not in returned]
        extra = [str(k) for k in returned if k not in SPLITS + ("n_classes",)]
        if missing or extra:
            what = f"missing {', '.join(missing)}" if missing else f"unknown keys {', '.join(extra)}"
            raise DataError(f"{_KEY}: {shape} ({what})")
        items = [returned[s] for s in SPLITS]
        n_classes = returned.get("n_classes")
        if n_classes is not None and (not isinstance(n_classes, int) or isinstance(n_classes, bool) or n_classes < 2):
            raise DataError(f"{_KEY}: n_classes must be an integer >= 2 (got {n_classes!r})")
    elif isinstance(returned, Sequence) and not isinstance(returned, (str, bytes)) and len(returned) == 3:
        items = list(returned)
    else:
        raise DataError(f"{_KEY}: {shape} (got {_describe(returned)})")
    return {name: _split(name, item) for name, item in zip(SPLITS, items)}, n_classes


def _split(name: str, item: Any) -> tuple[torch.Tensor, torch.Tensor] | Dataset:
    if isinstance(item, IterableDataset):
        raise DataError(f"{_KEY}: the {name} split is an IterableDataset; dlsearch needs a map-style Dataset "
                        "(__len__ and __getitem__) to shuffle it with the trial's seed")
    if isinstance(item, Dataset):
        if len(item) == 0:  # type: ignore[arg-type]
            raise DataError(f"{_KEY}: the {name} split is empty")
        return item
    if isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 2:
        return _pair(name, item[0], item[1])
    raise DataError(f"{_KEY}: the {name} split must be an (x, y) pair of tensors or a torch Dataset "
                    f"(got {_describe(item)})")


def _pair(name: str, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        x, y = (v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v)) for v in (x, y))
    except (TypeError, ValueError, RuntimeError) as err:
        raise DataError(f"{_KEY}: the {name} split's x and y must be tensors or arrays ({err})") from None
    if x.dim() < 2:
        raise DataError(f"{_KEY}: the {name} split's x must have shape (N, *input_shape) (got {tuple(x.shape)}); "
                        "a single feature is (N, 1)")
    if y.dim() != 1 or len(y) != len(x):
        raise DataError(f"{_KEY}: the {name} split's y must have shape ({len(x)},), one label per sample "
                        f"(got {tuple(y.shape)})")
    if len(x) == 0:
        raise DataError(f"{_KEY}: the {name} split is empty")
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise DataError(f"{_KEY}: the {name} split's y must hold class indices 0..K-1 (got non-integer values)")
    return x.float(), y.long()


def _tensor_bundle(splits: dict[str, Any], n_classes: int | None) -> DataBundle:
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (splits[s] for s in SPLITS)
    if not (x_train.shape[1:] == x_val.shape[1:] == x_test.shape[1:]):
        raise DataError(f"{_KEY}: every split's samples must have one shape (got train {tuple(x_train.shape[1:])}, "
                        f"val {tuple(x_val.shape[1:])}, test {tuple(x_test.shape[1:])})")
    labels = torch.cat([y_train, y_val, y_test])
    if labels.min() < 0:
        raise DataError(f"{_KEY}: labels must be class indices 0..K-1 (found {int(labels.min())})")
    found = int(labels.max()) + 1
    n_classes = n_classes or max(found, 2)
    if found > n_classes:
        raise DataError(f"{_KEY}: labels must be below n_classes {n_classes} (found {found - 1})")
    return DataBundle(x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test,
                      input_shape=tuple(x_train.shape[1:]), n_classes=n_classes)


def _dataset_bundle(splits: dict[str, Any], n_classes: int | None) -> DatasetBundle:
    datasets = {name: TensorDataset(*s) if isinstance(s, tuple) else s for name, s in splits.items()}
    sample = datasets["train"][0]
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2):
        raise DataError(f"{_KEY}: a Dataset's items must be (x, y) pairs (got {_describe(sample)} for train[0])")
    x0 = torch.as_tensor(sample[0])
    if x0.dim() < 1:
        raise DataError(f"{_KEY}: a sample's x must have shape input_shape, at least one dimension (got a scalar)")
    if n_classes is None:
        n_classes = _n_classes_of(datasets["train"])
    return DatasetBundle(train=datasets["train"], val=datasets["val"], test=datasets["test"],
                         input_shape=tuple(x0.shape), n_classes=n_classes)


def _n_classes_of(train: Dataset) -> int:
    classes = getattr(train, "classes", None)
    if classes is not None and len(classes) >= 2:
        return len(classes)
    # Counting the labels would read the whole training set, which may not fit in memory.
    raise DataError(f"{_KEY}: returned torch Datasets without a class count; return "
                    '{"train": ..., "val": ..., "test": ..., "n_classes": K} or give the training Dataset '
                    "a `classes` list")


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"
