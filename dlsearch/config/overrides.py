"""`--set PATH=VALUE`: a study key overridden by its dotted path (VALUE read as YAML).

Setting a searched key pins it: the key leaves the search space.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from dlsearch.config.schema import SpecError
from dlsearch.config.yaml_loader import load_yaml


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...], problems: list[str]) -> dict:
    """Apply `PATH=VALUE` overrides (VALUE parsed as YAML). Setting a searched key pins it."""

    raw = copy.deepcopy(raw)
    for item in overrides:
        path, sep, text = item.partition("=")
        path = path.strip()
        if not sep or not path:
            problems.append(f"--set {item}: expected PATH=VALUE, e.g. train.epochs=3")
            continue
        try:
            value = load_yaml(text, f"--set {item}") if text.strip() else None
        except yaml.YAMLError as err:
            problems.append(f"--set {path}: cannot parse the value {text!r} ({str(err).splitlines()[0]})")
            continue
        except SpecError as err:  # a value past the loader's bounds
            problems += err.problems
            continue
        parts = path.split(".")
        if parts[0] == "search" and len(parts) > 1:
            _set_search(raw, parts[1:], value, item, problems)
            continue
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part) if isinstance(node, dict) else None
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"--set {path}: {'.'.join(parts[: i + 1])} is not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
            search = raw.get("search")
            if isinstance(search, dict) and path in search:
                del search[path]  # a value set on the command line is no longer searched
    return raw


_DIM_KEYS = ("type", "low", "high", "log", "step", "choices", "when")


def _set_search(raw: dict, parts: list[str], value: Any, item: str, problems: list[str]) -> None:
    search = raw.setdefault("search", {})
    if not isinstance(search, dict):
        problems.append(f"--set {item}: search is not a mapping")
        return
    # The search key is itself dotted ("train.lr"); a trailing dim key sets one field of it.
    if len(parts) > 1 and parts[-1] in _DIM_KEYS and ".".join(parts[:-1]) in search:
        dim = search[".".join(parts[:-1])]
        if isinstance(dim, dict):
            dim[parts[-1]] = value
            return
    search[".".join(parts)] = value


# ---------------------------------------------------------------- checks
