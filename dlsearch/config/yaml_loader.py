"""Reading a study file's YAML: safe (no object tags), YAML 1.2 floats, duplicate keys refused."""

from __future__ import annotations

import re
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


# ---------------------------------------------------------------- overrides


def parse_yaml(text: str, source: str = "<study>") -> dict:
    """Safe-load YAML (no object tags, duplicate keys rejected) with line/column in errors."""
    try:
        raw = yaml.load(text, Loader=_StudyLoader)  # noqa: S506 - _StudyLoader is a SafeLoader
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
