"""Every rule of a study file beyond its schema, each problem one line on its dotted path.

The checks collect: a study with five problems shows five lines, in the order of the file's
sections. Optuna itself checks the sampler's and pruner's options (`dlsearch.search.build`).
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError

from dlsearch.config.schema import (
    CONFIG_KEYS,
    DEFAULT_PRUNER,
    DEFAULT_SAMPLER,
    IMAGE_DATASETS,
    IMAGE_SIDES,
    PLAIN_KEY,
    REPORTED_METRICS,
    SEARCHABLE_SECTIONS,
    SEQUENCE_KINDS,
    CategoricalDim,
    DataSpec,
    FloatDim,
    ModelSpec,
    ObjectiveSpec,
    PrunerSpec,
    SamplerSpec,
    SearchDim,
    StudySpec,
)
from dlsearch.search.build import check_optuna_options  # Optuna's word on its own options


def _model_for(section_model: type[BaseModel], key: str) -> type[BaseModel] | None:
    field = section_model.model_fields.get(key)
    if field is None:
        return None
    ann = field.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def unknown_keys(raw: dict) -> list[str]:
    """Every key the schema does not know, anywhere in the study, with a "did you mean"."""
    problems: list[str] = []
    _check_unknown_keys(raw, problems)
    return problems


def problems_with_schema_errors(raw: dict, err: ValidationError, base_dir: str | Path | None) -> list[str]:
    """The schema's errors (types, allowed values) and every rule that can still be checked beside them."""
    return ([_format_pydantic(e) for e in _relevant_errors(err.errors())] + _check_search(raw, None)
            + _check_optuna_sections(raw) + _check_objective_section(raw) + _check_entry_points(raw, base_dir))


def problems_of(raw: dict, spec: StudySpec, base_dir: str | Path | None) -> list[str]:
    """Every rule beyond the schema, for a study whose schema holds."""
    return _check_search(raw, spec) + _check_rest(spec) + _check_entry_points(raw, base_dir)


def search_problems(spec: StudySpec) -> list[str]:
    """What stops a study from being searched (`validate`, `run`), though `train` can run it once."""
    if not spec.search:
        return ["search: nothing to search (got {}); give at least one dimension, or run the fixed values once "
                "with `dlsearch train STUDY`"]
    return []


def dedupe(problems: list[str]) -> list[str]:
    """The problems in order, each once."""
    return _dedupe(problems)


def _check_unknown_keys(raw: dict, problems: list[str]) -> None:
    """Unknown keys anywhere, with a "did you mean"; extra keys of custom sections are kept."""
    _walk_unknown(raw, StudySpec, "", problems)


def _walk_unknown(node: Any, model: type[BaseModel], prefix: str, problems: list[str]) -> None:
    if not isinstance(node, dict):
        return
    fields = list(model.model_fields)
    passthrough = _allows_extra(model, node)
    for key in list(node):
        path = f"{prefix}{key}"
        if key not in model.model_fields:
            if passthrough:
                continue
            hint = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            problems.append(
                f"{path}: unknown key"
                + (f" (did you mean {hint[0]}?)" if hint else f"; known keys: {', '.join(fields)}")
            )
            del node[key]
            continue
        sub = _model_for(model, key)
        if sub is not None:
            _walk_unknown(node[key], sub, f"{path}.", problems)


def _allows_extra(model: type[BaseModel], node: dict) -> bool:
    if model is DataSpec:
        return node.get("dataset") == "custom"
    if model is ModelSpec:
        return node.get("kind") == "custom"
    return model in (SamplerSpec, PrunerSpec)  # checked against the Optuna constructor later


_FRIENDLY = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "missing": "is required",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "string_too_short": "must not be empty",
    "union_tag_not_found": "needs a `type`: float, int or categorical",
    "union_tag_invalid": "`type` must be one of float, int, categorical",
}


def _relevant_errors(errors: list[dict]) -> list[dict]:
    """Drop a union's "wrong shape" complaints when another member explains the real problem.

    `objective: {metric: x, direction: max}` fails both as a mapping (bad direction) and
    as a list; only the first is worth saying.
    """
    shape = {"list_type", "dict_type", "model_type", "model_attributes_type"}
    out = []
    for e in errors:
        root = e["loc"][:1]
        if e["type"] in shape and any(o is not e and o["loc"][:1] == root and o["type"] not in shape for o in errors):
            continue
        out.append(e)
    return out


def _check_optuna_sections(raw: dict) -> list[str]:
    """The sampler and pruner options, checked even when other sections are broken."""
    try:
        sampler = SamplerSpec.model_validate(raw.get("sampler", DEFAULT_SAMPLER))
        pruner = PrunerSpec.model_validate(raw.get("pruner", DEFAULT_PRUNER))
    except ValidationError:
        return []  # already reported
    return _optuna_problems(sampler, pruner, None)


def _format_pydantic(err: dict) -> str:
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "tagged-union["))]
    # Union members appear in loc as their type names; keep only real keys.
    loc = [p for p in loc if p not in ("float", "int", "categorical", "ObjectiveSpec", "list[ObjectiveSpec]",
                                       "literal['auto']", "str", "bool", "none", "list[union[bool,int,float,str,none]]")]
    path = ".".join(loc) or "study"
    kind = err["type"]
    ctx = err.get("ctx", {})
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        got = err.get("input")
        hint = difflib.get_close_matches(str(got), allowed, n=1, cutoff=0.6)
        msg = f"must be one of {', '.join(allowed)}" + (f"; did you mean {hint[0]}?" if hint else "")
    elif kind in _FRIENDLY:
        msg = _FRIENDLY[kind].format(**{k: v for k, v in ctx.items()})
    else:
        msg = err["msg"][0].lower() + err["msg"][1:]
    if kind == "missing":
        return f"{path}: {msg}"
    return f"{path}: {msg} (got {_show(err.get('input'))})"


def _show(value: Any) -> str:
    if isinstance(value, dict) and len(str(value)) > 60:
        return "{...}"
    return repr(value) if isinstance(value, str) else str(value)


def _dedupe(problems: list[str]) -> list[str]:
    return list(dict.fromkeys(problems))


def _field_info(path: str) -> tuple[type[BaseModel], str] | None:
    """The section model and field name a dotted config path points at, or None."""
    parts = path.split(".")
    if parts[0] not in SEARCHABLE_SECTIONS or len(parts) < 2:
        return None
    model: type[BaseModel] = StudySpec
    for part in parts[:-1]:
        sub = _model_for(model, part)
        if sub is None:
            return None
        model = sub
    return (model, parts[-1]) if parts[-1] in model.model_fields else None


def _path_exists(path: str, raw: dict) -> bool:
    if _field_info(path) is not None:
        return True
    parts = path.split(".")
    if len(parts) == 2 and parts[0] in ("data", "model"):
        section = raw.get(parts[0])
        custom = isinstance(section, dict) and section.get(
            "dataset" if parts[0] == "data" else "kind"
        ) == "custom"
        return custom  # a custom section's own keys are searchable by their path
    return False


def _all_paths() -> list[str]:
    out = []
    for section in SEARCHABLE_SECTIONS:
        model = _model_for(StudySpec, section)
        for name in model.model_fields:
            sub = _model_for(model, name)
            if sub:
                out += [f"{section}.{name}.{n}" for n in sub.model_fields]
            else:
                out.append(f"{section}.{name}")
    return out


def _check_search(raw: dict, spec: StudySpec | None) -> list[str]:
    """Rules a search dimension must obey beyond its types, and that its values fit the key."""
    problems: list[str] = []
    search = raw.get("search")
    if not isinstance(search, dict):
        return problems
    adapter = TypeAdapter(SearchDim)
    dims: dict[str, Any] = {}
    plain = raw.get("trainable") is not None  # a trainable's own keys may be plain names, as in Optuna
    for key, dim_raw in search.items():
        where = f"search.{key}"
        if plain and PLAIN_KEY.match(str(key)):
            if key in CONFIG_KEYS:
                problems.append(f"{where}: {key!r} is a key of the config a trainable gets; name the dimension "
                                f"otherwise (config holds {', '.join(CONFIG_KEYS)})")
                continue
        elif not _path_exists(str(key), raw):
            hint = difflib.get_close_matches(str(key), _all_paths(), n=1, cutoff=0.6)
            problems.append(
                f"{where}: points at nothing; a search key is a dotted path into data, model or train"
                + (f" (did you mean {hint[0]}?)" if hint else "")
                + ("; a plain name is a search key of a study with a trainable" if PLAIN_KEY.match(str(key)) else "")
            )
            continue
        try:
            dim = adapter.validate_python(dim_raw)
        except ValidationError:
            continue  # already reported by the whole-study validation
        dims[key] = dim
        rules = _dim_rules(where, dim)
        said = {line.split(":")[0] for line in rules}
        problems += rules + [p for p in _dim_fits_field(where, key, dim, raw) if p.split(":")[0] not in said]
    for key, dim in dims.items():
        for cond_path, cond in (dim.when or {}).items():
            where = f"search.{key}.when.{cond_path}"
            if cond_path == key:
                problems.append(f"{where}: a dimension cannot depend on itself")
            elif cond_path not in search and not _path_exists(cond_path, raw):
                problems.append(f"{where}: points at nothing; a condition names a search key or config path")
            elif cond_path in dims:
                values = cond if isinstance(cond, list) else [cond]
                problems += [f"{where}: {v!r} is never sampled by search.{cond_path}"
                             for v in values if not _dim_can_take(dims[cond_path], v)]
    return problems


def _dim_rules(where: str, dim: Any) -> list[str]:
    out = []
    if isinstance(dim, CategoricalDim):
        if not dim.choices:
            out.append(f"{where}.choices: must not be empty (got [])")
        elif len(set(map(repr, dim.choices))) != len(dim.choices):
            out.append(f"{where}.choices: has duplicates (got {dim.choices})")
        return out
    if not all(math.isfinite(v) for v in (dim.low, dim.high)):
        return [f"{where}: low and high must be finite (got low={dim.low}, high={dim.high})"]
    if dim.low > dim.high:
        out.append(f"{where}: `low <= high` must hold (got low={dim.low}, high={dim.high})")
    if dim.log and dim.low <= 0:
        out.append(f"{where}.low: must be > 0 when log is true (got {dim.low})")
    if dim.step is not None:
        if dim.step <= 0:
            out.append(f"{where}.step: must be > 0 (got {dim.step})")
        elif dim.log and (dim.step != 1 or isinstance(dim, FloatDim)):
            out.append(f"{where}.step: cannot be combined with log: true (got {dim.step})")
        elif dim.low <= dim.high:
            n = (dim.high - dim.low) / dim.step
            if abs(n - round(n)) > 1e-8:
                out.append(f"{where}.step: must divide high - low = {dim.high - dim.low:g} (got {dim.step})")
    return out


def _dim_fits_field(where: str, key: str, dim: Any, raw: dict) -> list[str]:
    """Each value the dimension can take must be valid for the key it sets."""

    info = _field_info(key)
    if info is None:
        return []  # a custom section's own key: any value goes to the user's code
    model, field = info
    if isinstance(dim, FloatDim) and _is_int_field(model.model_fields[field].annotation):
        return [f"{where}.type: {key} holds an integer; use type: int (got float)"]
    if isinstance(dim, CategoricalDim):
        probes = [(f"{where}.choices[{i}]", v) for i, v in enumerate(dim.choices)]
    else:
        probes = [(f"{where}.low", dim.low), (f"{where}.high", dim.high)]
    section, *inner = key.split(".")
    base = raw.get(section) if isinstance(raw.get(section), dict) else {}
    out = []
    for probe_where, value in probes:
        trial = copy.deepcopy(base)
        node = trial
        for part in inner[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[inner[-1]] = value
        try:
            _model_for(StudySpec, section).model_validate(trial)
        except ValidationError as err:
            for e in err.errors():
                if [str(p) for p in e["loc"][: len(inner)]] == inner:
                    out.append(f"{probe_where}: " + _format_pydantic({**e, "loc": ()}).split(": ", 1)[1])
    return out


def _is_int_field(ann: Any) -> bool:
    if ann is int:
        return True
    return get_origin(ann) is Union and int in get_args(ann) and float not in get_args(ann)


def _dim_can_take(dim: Any, value: Any) -> bool:
    if isinstance(dim, CategoricalDim):
        return any(value == c and type(value) is type(c) for c in dim.choices)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and dim.low <= value <= dim.high


def _check_objective_section(raw: dict) -> list[str]:
    """The objective's metrics, checked even when other sections are broken."""
    if raw.get("trainable") is not None:
        return []
    try:
        objective = TypeAdapter(Union[ObjectiveSpec, list[ObjectiveSpec]]).validate_python(raw.get("objective"))
    except ValidationError:
        return []  # already reported
    return _unreported_metrics(tuple(objective) if isinstance(objective, list) else (objective,))


def _unreported_metrics(objectives: tuple[ObjectiveSpec, ...]) -> list[str]:
    out = []
    for i, obj in enumerate(objectives):
        if obj.metric not in REPORTED_METRICS:
            where = "objective.metric" if len(objectives) == 1 else f"objective[{i}].metric"
            hint = difflib.get_close_matches(obj.metric, REPORTED_METRICS, n=1, cutoff=0.5)
            out.append(
                f"{where}: the trial never reports {obj.metric!r}; it reports {', '.join(REPORTED_METRICS)}"
                + (f" (did you mean {hint[0]}?)" if hint else "")
            )
    return out


def _check_rest(spec: StudySpec) -> list[str]:
    out: list[str] = []
    objectives = spec.objectives
    if not objectives:
        out.append("objective: needs at least one {metric, direction}")
    if spec.trainable is None:
        out += _unreported_metrics(objectives)
    if len(objectives) > 1 and spec.pruner.type != "none":
        out.append(f"pruner.type: pruning needs a single objective; use none with {len(objectives)} objectives "
                   f"(got {spec.pruner.type})")
    if len(objectives) > 1 and spec.sampler.type in ("cmaes", "gp", "grid") and spec.sampler.type != "grid":
        out.append(f"sampler.type: {spec.sampler.type} optimizes a single objective (got {len(objectives)} objectives)")
    if spec.tracking.register_best and any(c in spec.name for c in "/:"):
        # MLflow's Model Registry rejects such names, and would be reached only after every trial ran.
        out.append(f"name: the Model Registry cannot hold a model named {spec.name!r} (no '/' or ':'); "
                   "rename the study or set tracking.register_best: false")
    if spec.model.kind == "cnn" and spec.data.dataset not in IMAGE_DATASETS + ("custom",):
        out.append(f"model.kind: cnn needs image data; dataset {spec.data.dataset} gives flat features (got cnn)")
    if spec.data.dataset == "csv" and not spec.data.path:
        out.append("data.path: is required for dataset csv (the CSV file)")
    # With a custom trainable the data and model sections are only configuration it reads.
    if spec.data.dataset == "custom" and not spec.data.factory and spec.trainable is None:
        out.append("data.factory: is required for dataset custom (\"package.module:function\")")
    if spec.data.dataset != "custom" and spec.data.factory:
        out.append(f"data.factory: is used only with dataset custom (got dataset {spec.data.dataset})")
    if spec.model.kind == "custom" and not spec.model.factory and spec.trainable is None:
        out.append("model.factory: is required for kind custom (\"package.module:function\")")
    if spec.model.kind != "custom" and spec.model.factory:
        out.append(f"model.factory: is used only with kind custom (got kind {spec.model.kind})")
    out += _check_practice(spec)
    out += _check_population(spec)
    if spec.model.kind == "cnn" and spec.model.kernel_size % 2 == 0:
        out.append(f"model.kernel_size: must be odd so that convolutions keep the image size (got {spec.model.kernel_size})")
    gpus = spec.resources.gpus_per_trial
    if gpus != "auto" and gpus < 0:
        out.append(f"resources.gpus_per_trial: must be >= 0 or auto (got {gpus})")
    mc = spec.resources.max_concurrent
    if mc != "auto" and mc < 1:
        out.append(f"resources.max_concurrent: must be >= 1 or auto (got {mc})")
    if spec.sampler.type == "grid":
        for key, dim in spec.search.items():
            if isinstance(dim, FloatDim) and dim.step is None:
                out.append(f"search.{key}.step: the grid sampler needs every float dimension stepped "
                           "(or categorical)")
    said = any(line.startswith(("sampler", "pruner")) for line in out)  # one line per mistake, not two
    out += _optuna_problems(spec.sampler, spec.pruner, None if said else spec)
    return out


def _optuna_problems(sampler: SamplerSpec, pruner: PrunerSpec, spec: StudySpec | None) -> list[str]:
    """Optuna's own word on the sampler's and pruner's options, on their keys' paths; with a valid
    study, both are also used as its run would use them (its directions, its epoch range)."""
    directions = [o.direction for o in spec.objectives] if spec is not None else None
    return check_optuna_options(sampler.type, dict(sampler.model_extra or {}), pruner.type,
                                dict(pruner.model_extra or {}), directions, spec.train.epochs if spec else 3)


def _check_practice(spec: StudySpec) -> list[str]:
    """The rules of the sequence models, augmentation, losses and transfer learning (fixed values)."""
    out: list[str] = []
    m, d, t = spec.model, spec.data, spec.train
    image = d.dataset in IMAGE_DATASETS or d.dataset == "custom"
    if not image and (d.resize is not None or d.pad):
        key = "data.resize" if d.resize is not None else "data.pad"
        out.append(f"{key}: applies to image datasets ({', '.join(IMAGE_DATASETS)}) (got dataset {d.dataset})")
    if not image and (t.augment.shift_px or t.augment.rotate_deg):
        key = "train.augment.shift_px" if t.augment.shift_px else "train.augment.rotate_deg"
        out.append(f"{key}: augmentation transforms images; dataset {d.dataset} gives flat features")
    if m.kind in SEQUENCE_KINDS and m.depth == 0:
        out.append(f"model.depth: {m.kind} needs at least one layer (got 0)")
    if m.kind == "transformer" and m.patch_size and d.dataset in ("synthetic", "csv"):
        out.append(f"model.patch_size: patches need images; dataset {d.dataset} gives flat features "
                   f"(use 0: each feature a token) (got {m.patch_size})")
    if m.kind == "transformer" and m.width % m.heads:
        out.append(f"model.heads: must divide model.width (the d_model) (got heads {m.heads}, width {m.width})")
    side = (d.resize or IMAGE_SIDES[d.dataset]) + 2 * d.pad if d.dataset in IMAGE_SIDES else None
    if m.kind == "transformer" and m.patch_size and side is not None and side % m.patch_size:
        out.append(f"model.patch_size: must divide the image side {side} of {d.dataset} (got {m.patch_size})")
    n_classes = {"mnist": 10, "fashion_mnist": 10, "digits": 10, "synthetic": d.n_classes}.get(d.dataset)
    if t.loss == "bce" and n_classes not in (None, 2):
        out.append(f"train.loss: bce (one logit) needs 2 classes; {d.dataset} has {n_classes} (use auto)")
    if m.init_from is not None:
        from dlsearch.config.sources import source_problem  # torch-free check of the reference's form

        line = source_problem(m.init_from, spec.path.parent if spec.path else None)
        if line:
            out.append(f"model.init_from: {line}")
    if isinstance(m.freeze, list) and not all(isinstance(x, str) and x for x in m.freeze):
        out.append(f"model.freeze: must be none, backbone or a list of layer names (got {m.freeze})")
    return out


def _check_population(spec: StudySpec) -> list[str]:
    """`resources.population` > 1 needs trials a population can stack (`population.stack_problems`,
    read torch-free from the fixed values; a searched key may still give stackable trials)."""
    k = spec.resources.population
    if k == 1:
        return []
    m, t = spec.model, spec.train
    fixed = [
        (spec.trainable is not None, f"a custom trainable runs its own loop (trainable is {spec.trainable})"),
        (m.kind != "mlp" and "model.kind" not in spec.search, f"populations stack mlp models (model.kind is {m.kind})"),
        (t.optimizer not in ("adam", "adamw", "sgd") and "train.optimizer" not in spec.search,
         f"populations train with adam, adamw or sgd (train.optimizer is {t.optimizer})"),
        (t.precision == "fp16" and "train.precision" not in spec.search,
         "populations do no fp16 loss scaling (train.precision is fp16; use bf16 or fp32)"),
        (m.init_from is not None, f"populations start from their own init (model.init_from is {m.init_from})"),
        (m.freeze != "none", f"populations train every layer (model.freeze is {m.freeze})"),
    ]
    return [f"resources.population: {why}; use 1 (got {k})" for bad, why in fixed if bad]


def _check_entry_points(raw: dict, base_dir: str | Path | None) -> list[str]:
    """Import every entry point the study names (also each searched choice of a factory)."""
    from dlsearch.config.entrypoints import problem

    refs: list[tuple[str, Any]] = []
    for section, switch in (("data", "dataset"), ("model", "kind")):
        node = raw.get(section)
        if isinstance(node, dict) and node.get(switch) == "custom" and node.get("factory") is not None:
            refs.append((f"{section}.factory", node["factory"]))
    if raw.get("trainable") is not None:
        refs.append(("trainable", raw["trainable"]))
    search = raw.get("search") if isinstance(raw.get("search"), dict) else {}
    for key in ("data.factory", "model.factory"):
        dim = search.get(key)
        if isinstance(dim, dict) and dim.get("type") == "categorical" and isinstance(dim.get("choices"), list):
            refs += [(f"search.{key}.choices[{i}]", c) for i, c in enumerate(dim["choices"]) if c is not None]
    out = []
    for where, ref in refs:
        if not isinstance(ref, str):
            continue  # the type is reported by the section's validation
        kind = where.split(".choices")[0].removeprefix("search.")
        line = problem(ref, kind, base_dir)
        if line is not None:
            out.append(where + line[len(kind):])
    return out
