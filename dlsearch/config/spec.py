"""The study file: load it, apply `--set` overrides, validate everything at once.

Contract: `load_spec(path, overrides)` returns a frozen `StudySpec` or raises
`SpecError` holding every problem, one line each, as `path: what is wrong (got X)`.
Nothing after this module touches the raw YAML dict.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, model_validator
from dlsearch.errors import InputError
from dlsearch.search.build import check_optuna_options  # Optuna's word on its own options

DATASETS = ("mnist", "fashion_mnist", "digits", "synthetic", "csv", "custom")
IMAGE_DATASETS = ("mnist", "fashion_mnist", "digits")
MODEL_KINDS = ("mlp", "cnn", "lstm", "gru", "transformer", "custom")
SEQUENCE_KINDS = ("lstm", "gru", "transformer")  # read an image row by row (or patch by patch)
ACTIVATIONS = ("relu", "leaky_relu", "gelu", "tanh", "sigmoid")
NORMS = ("none", "batch", "layer")
INITS = ("kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform", "orthogonal", "default")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "step", "cosine", "warmup_cosine", "onecycle")
LOSSES = ("auto", "cross_entropy", "bce")
IMAGE_SIDES = {"mnist": 28, "fashion_mnist": 28, "digits": 8}  # height = width of the built-in image datasets
SAMPLERS = ("random", "grid", "tpe", "cmaes", "gp", "qmc", "nsga2")
PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband", "patient", "threshold", "wilcoxon")
# What the built-in loop reports every epoch; any of them can be the objective.
REPORTED_METRICS = (
    "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_time_s", "generalization_gap",
)
SEARCHABLE_SECTIONS = ("data", "model", "train")

Scalar = Union[bool, int, float, str, None]


class SpecError(InputError):
    """Every problem found in a study, one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems

    def lines(self) -> list[str]:
        return list(self.problems)


class _Section(BaseModel):
    # strict: `epochs: "ten"` or `dropout: true` is an error, not a silent coercion.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class DataSpec(_Section):
    model_config = ConfigDict(extra="allow")  # extra keys survive only for `dataset: custom`
    dataset: Literal[DATASETS]
    root: str | None = None
    val_fraction: float = Field(0.1, gt=0, lt=1)
    subset: int | None = Field(None, gt=0)  # use at most N training samples (quick runs)
    download: bool = True
    path: str | None = None  # csv: the file
    label_column: str = "label"  # csv: the column holding the class
    test_fraction: float = Field(0.2, gt=0, lt=1)  # datasets without an official test split
    n_samples: int = Field(4000, gt=0)  # synthetic
    n_features: int = Field(20, gt=0)  # synthetic
    n_classes: int = Field(4, ge=2)  # synthetic
    factory: str | None = None  # custom: "package.module:function", called as factory(data section, seed)
    n_workers: int | None = Field(None, ge=0)  # DataLoader processes for torch Datasets; None: CPU threads - 1
    resize: int | None = Field(None, gt=0)  # image datasets: resize to resize x resize pixels (bilinear)
    pad: int = Field(0, ge=0)  # image datasets: background pixels added on every side, after resize
    # The randomization test (Zhang et al. 2017), and a planted bug for `dlsearch sanity`:
    # training labels permuted, so nothing but memorization can fit them. Val and test keep theirs.
    shuffle_labels: bool = False


class ModelSpec(_Section):
    model_config = ConfigDict(extra="allow")  # extra keys survive only for `kind: custom`
    kind: Literal[MODEL_KINDS] = "mlp"
    depth: int = Field(2, ge=0)  # mlp: hidden layers; cnn: conv blocks; lstm/gru/transformer: layers
    width: int = Field(256, gt=0)  # mlp: hidden units; cnn: dense units before the head; lstm/gru: hidden size;
    # transformer: d_model
    activation: Literal[ACTIVATIONS] = "relu"
    dropout: float = Field(0.1, ge=0, lt=1)
    norm: Literal[NORMS] = "none"
    init: Literal[INITS] = "kaiming_normal"
    channels: int = Field(32, gt=0)  # cnn: channels of the first block, doubled per block
    kernel_size: int = Field(3, gt=0)  # cnn
    bidirectional: bool = False  # lstm/gru: read the sequence both ways
    heads: int = Field(4, gt=0)  # transformer: attention heads; must divide width
    patch_size: int = Field(0, ge=0)  # transformer: square patches as tokens; 0 takes image rows as tokens
    pooling: Literal["cls", "mean"] = "cls"  # transformer: a class token, or the mean of the tokens
    # Transfer learning: start from trained weights (an MLflow run id, models:/<name>@<alias> or
    # models:/<name>/<version>, or a checkpoint file); a head of another shape is drawn new.
    init_from: str | None = None
    # Parameters kept fixed in training: "backbone" (all but the head), "none", or layer names
    # (prefixes of parameter names: [hidden.0, hidden.1]).
    freeze: Union[Literal["none", "backbone"], list[str]] = "none"
    factory: str | None = None  # custom: "package.module:function", called as factory(model, input_shape, n_classes)

    @model_validator(mode="before")
    @classmethod
    def _custom_keeps_its_init(cls, data: Any) -> Any:
        # A custom model keeps the init its factory chose unless the study names one.
        if isinstance(data, dict) and data.get("kind") == "custom" and "init" not in data:
            return {**data, "init": "default"}
        return data


class EarlyStoppingSpec(_Section):
    patience: int = Field(5, gt=0)  # epochs without improvement before stopping
    min_delta: float = Field(0.0, ge=0)  # the least change that counts as improvement


class AugmentSpec(_Section):
    """Random image transforms drawn per sample, on the device, in training only."""

    shift_px: float = Field(0.0, ge=0)  # the most an image moves up/down and left/right, in pixels
    rotate_deg: float = Field(0.0, ge=0, le=180)  # the most an image turns either way, in degrees


class TrainSpec(_Section):
    epochs: int = Field(20, gt=0)
    batch_size: int = Field(128, gt=0)
    optimizer: Literal[OPTIMIZERS] = "adam"
    lr: float = Field(1.0e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal[SCHEDULES] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0)  # warmup_cosine: linear warmup length
    step_epochs: int = Field(5, gt=0)  # step: epochs between decays
    step_gamma: float = Field(0.1, gt=0, le=1)  # step: decay factor
    grad_clip: float = Field(1.0, ge=0)  # max global gradient norm (or max |gradient|, see grad_clip_mode); 0: off
    grad_clip_mode: Literal["norm", "value"] = "norm"  # clip the global norm, or each gradient element
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # share of the target spread over the other classes
    # auto: one logit with sigmoid + binary cross-entropy for 2 classes, else softmax cross-entropy.
    loss: Literal[LOSSES] = "auto"
    augment: AugmentSpec = AugmentSpec()
    early_stopping: EarlyStoppingSpec = EarlyStoppingSpec()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Mixed precision on CUDA (CPU stays fp32): bf16 autocast, or fp16 autocast with loss scaling.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    checkpoint_every: int = Field(1, gt=0)  # epochs between checkpoints a crashed trial resumes from
    # auto: channels_last (NHWC) for CNNs on CUDA, where cuDNN's convolutions run fastest in it.
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    # torch.compile the model (forward and backward); compiled code is cached per worker process,
    # so only the first trial of each shape on a worker pays for compiling.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"


class _Dim(_Section):
    when: dict[str, Union[Scalar, list[Scalar]]] | None = None


class FloatDim(_Dim):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = None


class IntDim(_Dim):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = 1


class CategoricalDim(_Dim):
    type: Literal["categorical"]
    choices: list[Scalar]


SearchDim = Annotated[Union[FloatDim, IntDim, CategoricalDim], Field(discriminator="type")]


class ObjectiveSpec(_Section):
    metric: str
    direction: Literal["minimize", "maximize"]


class SamplerSpec(_Section):
    model_config = ConfigDict(extra="allow")  # the other keys go to the Optuna sampler
    type: Literal[SAMPLERS] = "tpe"


class PrunerSpec(_Section):
    model_config = ConfigDict(extra="allow")  # the other keys go to the Optuna pruner
    type: Literal[PRUNERS] = "median"


class BudgetSpec(_Section):
    trials: int = Field(40, gt=0)
    timeout_s: float | None = Field(None, gt=0)


class ResourcesSpec(_Section):
    cpus_per_trial: float = Field(1, gt=0)
    gpus_per_trial: Union[Literal["auto"], float] = "auto"
    max_concurrent: Union[Literal["auto"], int] = "auto"
    address: str | None = None
    max_failures: int = Field(2, ge=0)  # worker crashes retried from the last checkpoint
    # Tune's checkpoints: on a cluster, a folder every node mounts or object storage (s3://...);
    # null keeps them beside the artifacts (mlruns/ray), which is enough on one machine.
    storage_path: str | None = None
    # K > 1: pending trials that share the model's shapes train together in one process as one
    # stacked model (dlsearch.population), up to K per Tune trial; each stays its own Optuna trial
    # and MLflow child run, pruned on its own. 1: one trial per Tune trial.
    population: int = Field(1, ge=1)
    # K trials in a row failing with the same reason stop the study (exit 1; rerun after the fix
    # continues it): a repeating failure is a configuration error, not a bad trial. 0: never.
    stop_after_identical_failures: int = Field(3, ge=0)


class TrackingSpec(_Section):
    uri: str = "sqlite:///mlruns/mlflow.db"
    artifacts: str = "mlruns/artifacts"
    optuna_storage: str = "sqlite:///mlruns/optuna.db"
    register_best: bool = True


class StudySpec(_Section):
    """A validated study. Frozen; derive per-trial configs with `trial_config`."""

    name: str = Field(min_length=1)
    seed: int = 42
    data: DataSpec
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    search: dict[str, SearchDim]
    objective: Union[ObjectiveSpec, list[ObjectiveSpec]]
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec(n_startup_trials=5, n_warmup_steps=2)
    budget: BudgetSpec = BudgetSpec()
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()
    trainable: str | None = None

    _path: Path | None = PrivateAttr(default=None)
    _text: str = PrivateAttr(default="")
    _overrides: tuple[str, ...] = PrivateAttr(default=())

    @property
    def objectives(self) -> tuple[ObjectiveSpec, ...]:
        return tuple(self.objective) if isinstance(self.objective, list) else (self.objective,)

    @property
    def path(self) -> Path | None:
        """The study file, if loaded from one."""
        return self._path

    @property
    def source_text(self) -> str:
        """The study file's text as the user wrote it (before overrides)."""
        return self._text

    @property
    def overrides(self) -> tuple[str, ...]:
        return self._overrides

    @property
    def slug(self) -> str:
        """The name made safe for file and folder names (a name like `../../x` cannot escape)."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.name).strip(".-") or "study"

    def fixed_value(self, path: str) -> Any:
        """The configured (non-searched) value at a dotted config path, or None."""
        node: Any = self
        for part in path.split("."):
            if not isinstance(node, BaseModel):
                return None
            node = getattr(node, part) if part in type(node).model_fields else (node.model_extra or {}).get(part)
        return node


# ---------------------------------------------------------------- loading


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StudySpec:
    """Read, override and validate a study file; raise SpecError with every problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError([f"{path}: no such study file"]) from None
    except OSError as err:
        raise SpecError([f"{path}: cannot read the study file ({err.strerror})"]) from None
    raw = parse_yaml(text, str(path))
    spec = spec_from_dict(raw, overrides, source=str(path), base_dir=path.resolve().parent)
    spec._path = path.resolve()
    spec._text = text
    return spec


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


def spec_from_dict(
    raw: dict, overrides: list[str] | tuple[str, ...] = (), source: str = "<study>",
    base_dir: str | Path | None = None,
) -> StudySpec:
    """Validate a study given as a dict (the YAML document), after `--set` overrides.

    Entry points (`data.factory`, `model.factory`, `trainable`) are imported to check them,
    from `base_dir` (the study file's folder), the working directory or the installed packages.
    """
    problems: list[str] = []
    raw = _apply_overrides(raw, overrides, problems)
    raw = _resolve_data_path(raw, base_dir)
    _check_unknown_keys(raw, problems)
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as err:
        problems += [_format_pydantic(e) for e in _relevant_errors(err.errors())]
        problems += _check_search(raw, None)
        problems += _check_optuna_sections(raw)
        problems += _check_objective_section(raw)
        problems += _check_entry_points(raw, base_dir)
        raise SpecError(_dedupe(problems)) from None
    problems += _check_search(raw, spec)
    problems += _check_rest(spec)
    problems += _check_entry_points(raw, base_dir)
    if problems:
        raise SpecError(_dedupe(problems))
    spec._overrides = tuple(overrides)
    return spec


def _resolve_data_path(raw: dict, base_dir: str | Path | None) -> dict:
    """A relative `data.path` names a file beside the study file when there is one there, else in the cwd."""
    data = raw.get("data")
    path = data.get("path") if isinstance(data, dict) else None
    if base_dir is None or not isinstance(path, str) or not path or Path(path).is_absolute():
        return raw
    beside = Path(base_dir) / path
    if not beside.is_file():
        return raw
    return {**raw, "data": {**data, "path": str(beside.resolve())}}


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


def _apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...], problems: list[str]) -> dict:
    """Apply `PATH=VALUE` overrides (VALUE parsed as YAML). Setting a searched key pins it."""
    import copy

    raw = copy.deepcopy(raw)
    for item in overrides:
        path, sep, text = item.partition("=")
        path = path.strip()
        if not sep or not path:
            problems.append(f"--set {item}: expected PATH=VALUE, e.g. train.epochs=3")
            continue
        try:
            value = yaml.load(text, Loader=_StudyLoader) if text.strip() else None  # noqa: S506
        except yaml.YAMLError as err:
            problems.append(f"--set {path}: cannot parse the value {text!r} ({str(err).splitlines()[0]})")
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


def _model_for(section_model: type[BaseModel], key: str) -> type[BaseModel] | None:
    field = section_model.model_fields.get(key)
    if field is None:
        return None
    ann = field.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


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
        sampler = SamplerSpec.model_validate(raw.get("sampler", {}))
        pruner = PrunerSpec.model_validate(raw.get("pruner", {"n_startup_trials": 5, "n_warmup_steps": 2}))
    except ValidationError:
        return []  # already reported
    return _optuna_problems(sampler, pruner)


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
    for key, dim_raw in search.items():
        where = f"search.{key}"
        if not _path_exists(str(key), raw):
            hint = difflib.get_close_matches(str(key), _all_paths(), n=1, cutoff=0.6)
            problems.append(
                f"{where}: points at nothing; a search key is a dotted path into data, model or train"
                + (f" (did you mean {hint[0]}?)" if hint else "")
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
    import copy

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
    out += _optuna_problems(spec.sampler, spec.pruner)
    return out


def _optuna_problems(sampler: SamplerSpec, pruner: PrunerSpec) -> list[str]:
    """Optuna's own word on the sampler's and pruner's options, on their keys' paths."""
    return check_optuna_options(sampler.type, dict(sampler.model_extra or {}), pruner.type,
                                dict(pruner.model_extra or {}))


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
