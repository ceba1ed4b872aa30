"""Reading a study file's YAML: safe (no object tags), YAML 1.2 floats, duplicate keys refused."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from dlsearch.config.schema import SpecError


class _StudyLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.2) and rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen[key] = True
        return super().construct_mapping(node, deep=deep)


_StudyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


# A study file is a page or two of YAML: the bounds below are far above any real one, and keep a
# hostile file (an alias bomb: a few hundred bytes that expand to a billion nodes) from hanging
# the checks that walk the document.
MAX_BYTES = 1_000_000
MAX_NODES = 20_000  # scalars, sequences and mappings, with every alias expanded
MAX_DEPTH = 32


def read_study_text(path: Path) -> str:
    """A study file's text; SpecError (one line naming the file) when it is not UTF-8 text or too large."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise SpecError([f"{path}: no such study file"]) from None
    except IsADirectoryError:
        raise SpecError([f"{path}: cannot read the study file (it is a folder)"]) from None
    except OSError as err:
        raise SpecError([f"{path}: cannot read the study file ({err.strerror})"]) from None
    if len(data) > MAX_BYTES:
        raise SpecError([f"{path}: too large for a study file (over {MAX_BYTES:,} bytes)"])
    if b"\0" in data:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise SpecError([f"{path}:{line}: not a text file (a NUL byte); a study file is YAML text"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise SpecError([f"{path}:{line}:{column}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
                         "save the study file as UTF-8"]) from None


def load_yaml(text: str, source: str) -> Any:
    """One YAML document, safely: composed first, refused when it expands past the bounds above."""
    loader = _StudyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, source)
        return loader.construct_document(node)
    except RecursionError:  # PyYAML composes nested nodes recursively: thousands of levels exhaust the stack
        raise SpecError([f"{source}: nested deeper than {MAX_DEPTH} levels; a study file is a few levels deep"]) from None
    finally:
        loader.dispose()


def _check_size(root: yaml.Node, source: str) -> None:
    """Count the document's nodes as the checks would walk them (aliases expanded), without expanding."""
    sizes: dict[int, int] = {}  # node id -> its expanded size: an alias is the same node object again

    def size(node: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            line = node.start_mark.line + 1
            raise SpecError([f"{source}:{line}: nested deeper than {MAX_DEPTH} levels; a study file is a few levels "
                             "deep"])
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = MAX_NODES + 1  # a node inside itself (a recursive alias) is over the bound
        children = (node.value if isinstance(node, yaml.SequenceNode)
                    else [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        total = 1
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_NODES:
                break
        sizes[id(node)] = total
        return total

    if size(root, 0) > MAX_NODES:
        raise SpecError([f"{source}: expands to more than {MAX_NODES:,} values (YAML aliases: `&name` / `*name`); "
                         "a study file is far smaller"])


# ---------------------------------------------------------------- overrides


def parse_yaml(text: str, source: str = "<study>") -> dict:
    """Safe-load YAML (no object tags, duplicate keys rejected) with line/column in errors."""
    try:
        raw = load_yaml(text, source)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        what = " ".join(str(p) for p in (err.context, err.problem) if p)
        raise SpecError([f"{where}: YAML syntax error: {what}"]) from None
    except yaml.YAMLError as err:
        raise SpecError([f"{source}: YAML error: {err}"]) from None
    if raw is None:
        raise SpecError([f"{source}: the study file is empty"])
    if not isinstance(raw, dict):
        raise SpecError([f"{source}: a study file is a mapping of keys (got {type(raw).__name__})"])
    return raw
