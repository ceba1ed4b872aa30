"""The study file's schema: every section and key, its type, default and allowed values.

Frozen pydantic models, strict types (`epochs: "ten"` is an error, not a coercion);
`SpecError` carries every problem found, one line each.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from dlsearch.errors import InputError

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
PRUNERS = ("none", "median", "percentile", "successive_halving", "asha", "hyperband", "patient", "threshold", "wilcoxon")
# What the built-in loop reports every epoch; any of them can be the objective.
REPORTED_METRICS = (
    "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_time_s", "generalization_gap",
)
SEARCHABLE_SECTIONS = ("data", "model", "train")
# The top-level keys of the config a custom trainable gets: a plain search key may not take one of these names.
CONFIG_KEYS = ("study", "number", "seed", "data_seed", "data", "model", "train", "objective", "params", "trainable")
PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # a trainable's own search key: `x`, as in Optuna or Ray Tune

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
    # asha: successive halving with rungs at 15% and 45% of the epochs (search/build.py): it beat
    # Optuna's pairings on LCBench's curves (BENCHMARKS.md), where the SPEC says median.
    type: Literal[PRUNERS] = "asha"


# Where a study file has no `sampler:` / `pruner:` section (the SPEC says {type: tpe} and
# {type: median, n_startup_trials: 5, n_warmup_steps: 2}; README, "Choices").
DEFAULT_SAMPLER = {"type": "tpe", "n_startup_trials": "auto"}  # auto: max(3, trials at once)
DEFAULT_PRUNER = {"type": "asha"}


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
    sampler: SamplerSpec = SamplerSpec(**DEFAULT_SAMPLER)
    pruner: PrunerSpec = PrunerSpec(**DEFAULT_PRUNER)
    budget: BudgetSpec = BudgetSpec()
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()
    trainable: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _trainable_needs_no_data(cls, data: Any) -> Any:
        # A trainable brings its own data: the data section is configuration it may read, or nothing.
        if isinstance(data, dict) and data.get("trainable") is not None and "data" not in data:
            return {**data, "data": {"dataset": "custom"}}
        return data

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
