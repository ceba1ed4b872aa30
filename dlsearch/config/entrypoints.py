"""The user's code that a study file names: `"package.module:function"` entry points.

Three plug points (SPEC, "Bring your own code"), each called with positional arguments:

- `data.factory(data_section: dict, seed: int)` -> train / val / test splits (see `dlsearch.trial.data`);
- `model.factory(model_section: dict, input_shape: tuple[int, ...], n_classes: int)` -> `nn.Module`;
- `trainable(config: dict, report)` -> final metrics or None (see `dlsearch.trial.custom_trainable`).

`resolve(ref, key, base_dir)` imports the module and returns the callable. The module is looked
for in the study file's folder (`base_dir`), then the working directory, then the installed
packages; the two folders go to the front of `sys.path` and stay there, so the module can import
its siblings later and objects pickled from it (checkpoints, Datasets sent to loader workers)
load again. `problem(ref, key, base_dir)` answers the same for `dlsearch validate`: the one line
that says what is wrong, naming `key` and quoting the import error, or None.

Only the standard library is imported here: a trial resolves its entry points in a plain shell.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import re
import sys
import sysconfig
from pathlib import Path
from typing import Any, Callable, Iterable

from dlsearch.errors import InputError

# key -> the positional parameters the entry point is called with (named for error messages).
PARAMETERS: dict[str, tuple[str, ...]] = {
    "data.factory": ("data", "seed"),
    "model.factory": ("model", "input_shape", "n_classes"),
    "trainable": ("config", "report"),
}
_REF = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")


class EntryPointError(InputError):
    """An entry point that cannot be used; the message is one line `key: what is wrong`."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def resolve(ref: str, key: str, base_dir: str | Path | None = None) -> Callable[..., Any]:
    """The callable `ref` ("package.module:function") names, checked against `key`'s signature.

    Raises EntryPointError naming `key`: a malformed reference, a module that cannot be
    imported (with the import error), a missing attribute, something not callable, or a
    callable that cannot take `key`'s positional arguments.
    """
    match = _REF.match(ref.strip()) if isinstance(ref, str) else None
    if match is None:
        raise EntryPointError(key, f'must be "package.module:function" (got {ref!r})')
    module_name, attr = match["module"], match["attr"]
    folders = search_paths(base_dir)
    add_search_paths(folders)
    importlib.invalidate_caches()  # a module written after this process first looked at the folder
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as err:  # noqa: BLE001 - whatever user code raises on import is the user's to see
        where = ""
        missing = err.name if isinstance(err, ModuleNotFoundError) else None
        if missing and (module_name == missing or module_name.startswith(f"{missing}.")):
            where = f"; looked in {', '.join(map(str, folders))} and the installed packages"
        raise EntryPointError(key, f"cannot import {module_name!r}: {_one_line(err)}{where} (got {ref!r})") from err
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise EntryPointError(key, f"module {module_name!r} ({_origin(module)}) has no attribute "
                                       f"{attr!r} (got {ref!r})")
        target = getattr(target, part)
    if not callable(target):
        raise EntryPointError(key, f"{ref!r} is not callable (got a {type(target).__name__})")
    expected = PARAMETERS.get(key)
    if expected is not None:
        _check_signature(target, key, ref, expected)
    return target


def problem(ref: str, key: str, base_dir: str | Path | None = None) -> str | None:
    """What is wrong with the entry point, as one line naming `key`; None when it resolves."""
    try:
        resolve(ref, key, base_dir)
    except EntryPointError as err:
        return str(err)
    return None


def search_paths(base_dir: str | Path | None = None) -> list[Path]:
    """Where user modules are looked for before the installed packages: the study's folder, the cwd."""
    folders = [Path(base_dir).resolve()] if base_dir else []
    folders.append(Path.cwd().resolve())
    return list(dict.fromkeys(folders))


def add_search_paths(folders: Iterable[str | Path]) -> None:
    """Put `folders` at the front of `sys.path`, in order; missing folders and repeats are skipped."""
    for folder in reversed([str(f) for f in folders]):
        if not os.path.isdir(folder):
            continue  # e.g. the driver's study folder seen from another node of a cluster
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(0, folder)


def local_code(refs: Iterable[str], base_dir: str | Path | None = None) -> list[Path]:
    """The folders or files holding the top-level packages of `refs` that are not installed.

    What a Ray cluster's workers need shipped (`py_modules`) besides the study folder
    (`working_dir`): user code found in the working directory or the study folder, not part
    of an installed distribution (editable ones included) or the standard library. References
    that do not resolve are skipped.
    """
    installed = {Path(p).resolve() for key in ("purelib", "platlib", "stdlib", "platstdlib")
                 if (p := sysconfig.get_paths().get(key))}
    distributed = importlib.metadata.packages_distributions()  # editable installs live outside site-packages
    out: list[Path] = []
    for ref in refs:
        match = _REF.match(ref.strip()) if isinstance(ref, str) else None
        if match is None or match["module"].split(".")[0] in distributed:
            continue
        add_search_paths(search_paths(base_dir))
        try:
            top = importlib.import_module(match["module"].split(".")[0])
        except Exception:  # noqa: BLE001 - validation reports it; nothing to ship
            continue
        origin = Path(next(iter(getattr(top, "__path__", [])), "") or getattr(top, "__file__", "") or "")
        if not origin.name:
            continue  # a built-in or namespace module: nothing on disk to ship
        origin = origin.resolve()
        if origin.is_file() and origin.name == "__init__.py":
            origin = origin.parent
        if not any(origin.is_relative_to(root) for root in installed):
            out.append(origin)
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------- helpers


def _check_signature(target: Callable[..., Any], key: str, ref: str, expected: tuple[str, ...]) -> None:
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return  # a builtin without introspectable signature: it will be called and may fail then
    try:
        signature.bind(*expected)
    except TypeError as err:
        raise EntryPointError(
            key, f"{ref} must take {len(expected)} positional arguments ({', '.join(expected)}); "
                 f"its signature is {signature} ({err})"
        ) from None


def _one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return " ".join(text.split())  # a SyntaxError's message spans lines (file, line, caret)


def _origin(module: Any) -> str:
    return getattr(module, "__file__", None) or "built-in"
