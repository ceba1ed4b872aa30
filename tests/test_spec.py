"""Tests for dlsearch.config (spec, schema, checks): the study file, its defaults, `--set` overrides and every validation rule.

Error tests check the path and the rule in the message, not just that SpecError was raised:
each problem is one line `path: what is wrong (got X)` (SPEC, "Bad input").
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from dlsearch.cli.commands import main
from dlsearch.config.spec import FloatDim, SpecError, StudySpec, load_spec, parse_yaml, spec_from_dict

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted((REPO / "studies").glob("*.yaml"))
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"

# The least a study needs (SPEC: name, data.dataset, objective, search), plus a few dimensions
# that the bad-snippet table below breaks one at a time.
MINIMAL: dict[str, Any] = {
    "name": "minimal",
    "data": {"dataset": "mnist"},
    "objective": {"metric": "val_accuracy", "direction": "maximize"},
    "search": {"train.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True}},
}
TWO_OBJECTIVES = [
    {"metric": "val_accuracy", "direction": "maximize"},
    {"metric": "epoch_time_s", "direction": "minimize"},
]
DELETE = object()  # a change that removes the key


def _study(changes: dict[tuple[str, ...], Any] | None = None) -> dict[str, Any]:
    """MINIMAL with `changes` applied: {key path as a tuple: new value, or DELETE}."""
    raw = copy.deepcopy(MINIMAL)
    for keys, value in (changes or {}).items():
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if value is DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = copy.deepcopy(value)
    return raw


def _problems(raw: dict[str, Any], overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(SpecError) as info:
        spec_from_dict(raw, overrides)
    problems = info.value.problems
    assert problems and all(isinstance(p, str) and "\n" not in p for p in problems)
    return problems


def _has(problems: list[str], path: str, phrase: str) -> bool:
    """Whether one line names `path` (exactly, before its colon) and states the rule `phrase`."""
    return any(line.startswith(f"{path}: ") and phrase in line for line in problems)


def _write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- shipped studies


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_every_study_validates(study: Path) -> None:
    spec = load_spec(study)
    assert spec.name and spec.search
    assert spec.path == study.resolve()
    assert spec.source_text == study.read_text()
    assert spec.source_text.startswith("#"), "every shipped study opens with a header comment (STYLE 8)"


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_every_study_passes_dlsearch_validate(study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # validate writes nothing: the folder it runs in stays empty
    result = CliRunner().invoke(main, ["validate", str(study)], env={"DLSEARCH_DATA_DIR": str(SHARED_DATA)})
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok:"), result.output
    assert list(tmp_path.iterdir()) == []


def test_studies_folder_is_not_empty() -> None:
    assert {p.name for p in STUDIES} >= {"mnist.yaml", "digits.yaml"}


# ---------------------------------------------------------------- defaults


def test_minimal_study_gets_the_spec_defaults() -> None:
    spec = spec_from_dict(_study())
    assert spec.seed == 42
    assert (spec.data.root, spec.data.val_fraction, spec.data.subset) == (None, 0.1, None)
    m = spec.model
    assert (m.kind, m.depth, m.width, m.activation, m.dropout, m.norm, m.init) == (
        "mlp", 2, 256, "relu", 0.1, "none", "kaiming_normal")
    t = spec.train
    assert (t.epochs, t.batch_size, t.optimizer, t.lr, t.momentum, t.weight_decay, t.schedule, t.grad_clip) == (
        20, 128, "adam", 1e-3, 0.9, 0.0, "cosine", 1.0)
    assert (t.early_stopping.patience, t.early_stopping.min_delta) == (5, 0.0)
    assert spec.sampler.type == "tpe" and spec.sampler.model_extra == {"n_startup_trials": "auto"}
    assert spec.pruner.type == "asha" and not spec.pruner.model_extra
    assert (spec.budget.trials, spec.budget.timeout_s) == (40, None)
    r = spec.resources
    assert (r.cpus_per_trial, r.gpus_per_trial, r.max_concurrent, r.address) == (1, "auto", "auto", None)
    k = spec.tracking
    assert (k.uri, k.artifacts, k.optuna_storage, k.register_best) == (
        "sqlite:///mlruns/mlflow.db", "mlruns/artifacts", "sqlite:///mlruns/optuna.db", True)
    assert spec.trainable is None
    assert spec.objectives == (spec.objective,)
    assert spec.path is None and spec.overrides == ()


def _spec_md_study() -> dict[str, Any]:
    text = (SHARED / "SPEC.md").read_text()
    block = re.search(r"```yaml\n(# studies/mnist\.yaml.*?)```", text, re.S)
    assert block, "SPEC.md holds the reference study in a ```yaml block"
    return yaml.safe_load(block.group(1))


@pytest.mark.skipif(not (SHARED / "SPEC.md").exists(), reason="needs ../shared/SPEC.md")
def test_defaults_match_every_value_in_spec_md() -> None:
    """SPEC: every key but name, data.dataset, objective and search 'has the default shown'."""
    documented = _spec_md_study()
    defaults = spec_from_dict(_study()).model_dump()
    for section in ("data", "model", "train", "budget", "resources", "tracking"):
        for key, value in documented[section].items():
            if (section, key) == ("data", "dataset"):
                continue
            assert defaults[section][key] == value, f"{section}.{key}"
    assert defaults["seed"] == documented["seed"]
    # The one documented difference (README, "Choices"; BENCHMARKS.md, the LCBench section): the
    # default search measured better than the SPEC's TPE + median on real learning curves.
    assert (documented["sampler"], documented["pruner"]) == (
        {"type": "tpe"}, {"type": "median", "n_startup_trials": 5, "n_warmup_steps": 2}), "the SPEC changed"
    assert (defaults["sampler"], defaults["pruner"]) == ({"type": "tpe", "n_startup_trials": "auto"}, {"type": "asha"})


@pytest.mark.skipif(not (SHARED / "SPEC.md").exists(), reason="needs ../shared/SPEC.md")
def test_spec_md_reference_study_validates() -> None:
    spec = spec_from_dict(_spec_md_study())
    assert spec.search["train.momentum"].when == {"train.optimizer": "sgd"}


# ---------------------------------------------------------------- one mistake, one line

TABLE = [
    # unknown keys, with a "did you mean"
    ("unknown-top-key", {("sead",): 1}, "sead", "unknown key (did you mean seed?)"),
    ("unknown-train-key", {("train", "epoch"): 3}, "train.epoch", "did you mean epochs?"),
    ("unknown-nested-key", {("train", "early_stopping", "patiense"): 3},
     "train.early_stopping.patiense", "did you mean patience?"),
    ("unknown-model-key", {("model", "depht"): 3}, "model.depht", "did you mean depth?"),
    # wrong types (strict: no silent coercion)
    ("epochs-str", {("train", "epochs"): "ten"}, "train.epochs", "must be an integer (got 'ten')"),
    ("dropout-bool", {("model", "dropout"): True}, "model.dropout", "must be a number"),
    ("seed-str", {("seed",): "x"}, "seed", "must be an integer"),
    ("model-not-mapping", {("model",): 5}, "model", "must be a mapping"),
    ("search-not-mapping", {("search",): [1, 2]}, "search", "must be a mapping"),
    ("choices-not-list", {("search", "train.batch_size"): {"type": "categorical", "choices": 64}},
     "search.train.batch_size.choices", "must be a list"),
    ("name-empty", {("name",): ""}, "name", "must not be empty"),
    ("data-missing", {("data",): DELETE}, "data", "is required"),
    ("search-missing", {("search",): DELETE}, "search", "is required"),
    # search dimensions
    ("dim-without-type", {("search", "train.lr"): {"low": 1e-4, "high": 1e-1}},
     "search.train.lr", "needs a `type`"),
    ("dim-unknown-type", {("search", "train.lr"): {"type": "loguniform", "low": 1e-4, "high": 1e-1}},
     "search.train.lr", "`type` must be one of float, int, categorical"),
    ("low-above-high", {("search", "train.lr"): {"type": "float", "low": 0.1, "high": 0.01}},
     "search.train.lr", "`low <= high` must hold (got low=0.1, high=0.01)"),
    ("log-with-low-zero", {("search", "train.lr"): {"type": "float", "low": 0.0, "high": 0.1, "log": True}},
     "search.train.lr.low", "must be > 0 when log is true"),
    ("empty-choices", {("search", "train.batch_size"): {"type": "categorical", "choices": []}},
     "search.train.batch_size.choices", "must not be empty"),
    ("duplicate-choices", {("search", "train.batch_size"): {"type": "categorical", "choices": [64, 64]}},
     "search.train.batch_size.choices", "has duplicates"),
    ("float-step-not-dividing", {("search", "model.dropout"): {"type": "float", "low": 0.0, "high": 0.5, "step": 0.3}},
     "search.model.dropout.step", "must divide high - low"),
    ("int-step-not-dividing", {("search", "model.depth"): {"type": "int", "low": 1, "high": 6, "step": 2}},
     "search.model.depth.step", "must divide high - low = 5 (got 2)"),
    ("negative-step", {("search", "model.dropout"): {"type": "float", "low": 0.0, "high": 0.5, "step": -0.1}},
     "search.model.dropout.step", "must be > 0"),
    ("step-with-log", {("search", "train.lr"): {"type": "float", "low": 1e-4, "high": 0.1, "log": True, "step": 0.01}},
     "search.train.lr.step", "cannot be combined with log"),
    ("search-key-points-at-nothing", {("search", "train.lrr"): {"type": "float", "low": 0.1, "high": 0.2}},
     "search.train.lrr", "points at nothing; a search key is a dotted path into data, model or train "
     "(did you mean train.lr?)"),
    ("search-key-outside-searchable-sections", {("search", "budget.trials"): {"type": "int", "low": 1, "high": 3}},
     "search.budget.trials", "points at nothing"),
    ("when-points-at-nothing",
     {("search", "train.momentum"): {"type": "float", "low": 0.5, "high": 0.9, "when": {"train.optimiser": "sgd"}}},
     "search.train.momentum.when.train.optimiser", "points at nothing"),
    ("when-value-never-sampled",
     {("search", "train.optimizer"): {"type": "categorical", "choices": ["adam", "sgd"]},
      ("search", "train.momentum"): {"type": "float", "low": 0.5, "high": 0.9, "when": {"train.optimizer": "rmsprop"}}},
     "search.train.momentum.when.train.optimizer", "'rmsprop' is never sampled by search.train.optimizer"),
    ("when-on-itself",
     {("search", "train.lr"): {"type": "float", "low": 1e-4, "high": 0.1, "when": {"train.lr": 0.1}}},
     "search.train.lr.when.train.lr", "cannot depend on itself"),
    # a dimension's values must be valid for the key it sets
    ("choice-invalid-for-key", {("search", "model.init"): {"type": "categorical", "choices": ["kaiming_normal", "glorot"]}},
     "search.model.init.choices[1]", "must be one of kaiming_normal"),
    ("choice-out-of-range", {("search", "train.batch_size"): {"type": "categorical", "choices": [64, 0]}},
     "search.train.batch_size.choices[1]", "must be > 0 (got 0)"),
    ("high-out-of-range", {("search", "model.dropout"): {"type": "float", "low": 0.0, "high": 1.0}},
     "search.model.dropout.high", "must be < 1"),
    ("float-dim-on-int-key", {("search", "model.depth"): {"type": "float", "low": 1, "high": 4}},
     "search.model.depth.type", "holds an integer; use type: int"),
    # unknown enum values
    ("unknown-dataset", {("data", "dataset"): "mnsit"}, "data.dataset", "must be one of mnist, fashion_mnist"),
    ("unknown-dataset-hint", {("data", "dataset"): "mnsit"}, "data.dataset", "did you mean mnist? (got 'mnsit')"),
    ("unknown-model-kind", {("model", "kind"): "resnet"}, "model.kind", "must be one of mlp, cnn, lstm, gru, transformer"),
    ("unknown-activation", {("model", "activation"): "relu6"}, "model.activation", "must be one of relu, leaky_relu"),
    ("unknown-init", {("model", "init"): "glorot"}, "model.init", "must be one of kaiming_normal"),
    ("unknown-norm", {("model", "norm"): "group"}, "model.norm", "must be one of none, batch, layer"),
    ("unknown-optimizer", {("train", "optimizer"): "adamm"}, "train.optimizer", "did you mean adam?"),
    ("unknown-schedule", {("train", "schedule"): "cosin"}, "train.schedule", "did you mean cosine?"),
    ("unknown-sampler", {("sampler",): {"type": "tpee"}}, "sampler.type", "must be one of random, grid, tpe"),
    ("unknown-pruner", {("pruner",): {"type": "medain"}}, "pruner.type", "did you mean median?"),
    ("unknown-direction", {("objective", "direction"): "max"}, "objective.direction", "must be one of minimize, maximize"),
    # the objective
    ("metric-never-reported", {("objective", "metric"): "val_acc"},
     "objective.metric", "the trial never reports 'val_acc'"),
    ("metric-never-reported-hint", {("objective", "metric"): "val_acc"},
     "objective.metric", "(did you mean val_accuracy?)"),
    ("second-metric-never-reported",
     {("objective",): [TWO_OBJECTIVES[0], {"metric": "epoch_time", "direction": "minimize"}], ("pruner",): {"type": "none"}},
     "objective[1].metric", "did you mean epoch_time_s?"),
    # ranges
    ("zero-trials", {("budget", "trials"): 0}, "budget.trials", "must be > 0 (got 0)"),
    ("negative-timeout", {("budget", "timeout_s"): -1}, "budget.timeout_s", "must be > 0"),
    ("zero-epochs", {("train", "epochs"): 0}, "train.epochs", "must be > 0"),
    ("negative-lr", {("train", "lr"): -1.0}, "train.lr", "must be > 0"),
    ("zero-patience", {("train", "early_stopping", "patience"): 0}, "train.early_stopping.patience", "must be > 0"),
    ("val-fraction-one", {("data", "val_fraction"): 1.0}, "data.val_fraction", "must be < 1"),
    ("val-fraction-zero", {("data", "val_fraction"): 0.0}, "data.val_fraction", "must be > 0"),
    ("dropout-one", {("model", "dropout"): 1.0}, "model.dropout", "must be < 1"),
    ("zero-subset", {("data", "subset"): 0}, "data.subset", "must be > 0"),
    ("negative-gpus", {("resources", "gpus_per_trial"): -1}, "resources.gpus_per_trial", "must be >= 0 or auto"),
    ("zero-concurrent", {("resources", "max_concurrent"): 0}, "resources.max_concurrent", "must be >= 1 or auto"),
    # sampler and pruner options go to Optuna; they are checked against its constructors
    ("unknown-sampler-option", {("sampler",): {"type": "tpe", "n_startup_trails": 5}},
     "sampler.n_startup_trails", "unknown option for the tpe sampler; did you mean n_startup_trials?"),
    ("unknown-pruner-option", {("pruner",): {"type": "median", "n_warmup_step": 2}},
     "pruner.n_warmup_step", "unknown option for the median pruner; did you mean n_warmup_steps?"),
    ("bad-pruner-value", {("pruner",): {"type": "median", "n_startup_trials": -1}},
     "pruner.n_startup_trials", "cannot be negative"),
    ("bad-percentile", {("pruner",): {"type": "percentile", "percentile": 150}},
     "pruner.percentile", "between 0 and 100"),
    ("percentile-missing", {("pruner",): {"type": "percentile"}}, "pruner.percentile", "is required"),
    ("patient-without-patience", {("pruner",): {"type": "patient"}}, "pruner.patience", "is required"),
    ("patient-wrapping-nothing-real", {("pruner",): {"type": "patient", "patience": 2, "wrapped": {"type": "bogus"}}},
     "pruner.wrapped.type", "must be one of none, median"),
    ("bad-sampler-value", {("sampler",): {"type": "nsga2", "population_size": 1}, ("pruner",): {"type": "none"},
                           ("objective",): TWO_OBJECTIVES},
     "sampler.population_size", "greater than or equal to 2"),
    ("grid-sampler-option", {("sampler",): {"type": "grid", "foo": 1},
                             ("search", "train.lr"): {"type": "categorical", "choices": [0.1]}},
     "sampler.foo", "unknown option for the grid sampler"),
    # rules across sections
    ("multi-objective-with-pruner", {("objective",): TWO_OBJECTIVES},
     "pruner.type", "pruning needs a single objective"),
    ("single-objective-sampler-on-two", {("objective",): TWO_OBJECTIVES, ("pruner",): {"type": "none"},
                                         ("sampler",): {"type": "cmaes"}},
     "sampler.type", "cmaes optimizes a single objective"),
    ("cnn-with-csv", {("data",): {"dataset": "csv", "path": "x.csv"}, ("model", "kind"): "cnn"},
     "model.kind", "cnn needs image data"),
    ("csv-without-path", {("data", "dataset"): "csv"}, "data.path", "is required for dataset csv"),
    ("cnn-even-kernel", {("model",): {"kind": "cnn", "kernel_size": 4}}, "model.kernel_size", "must be odd"),
    ("grid-with-unstepped-float", {("sampler",): {"type": "grid"}},
     "search.train.lr.step", "the grid sampler needs every float dimension stepped"),
]


@pytest.mark.parametrize(("changes", "path", "phrase"), [pytest.param(*row[1:], id=row[0]) for row in TABLE])
def test_one_mistake_gives_one_line_naming_its_path_and_rule(changes: dict, path: str, phrase: str) -> None:
    problems = _problems(_study(changes))
    assert _has(problems, path, phrase), problems
    assert len(problems) == 1, problems


def test_table_covers_enough_mistakes() -> None:
    assert len(TABLE) >= 25
    assert len({row[0] for row in TABLE}) == len(TABLE)


def test_every_row_of_the_table_is_a_valid_study_without_its_mistake() -> None:
    spec_from_dict(_study())  # the base the table breaks is itself valid


# ---------------------------------------------------------------- the YAML layer

YAML_TABLE = [
    ("duplicate-key", "name: a\nseed: 1\nname: b\n", "study.yaml:3:1", "duplicate key 'name'"),
    ("duplicate-nested-key", "name: a\ntrain:\n  lr: 0.1\n  lr: 0.2\n", "study.yaml:4:3", "duplicate key 'lr'"),
    ("unclosed-flow-mapping", "name: a\ndata: {dataset: mnist\nseed: 1\n", "study.yaml:3:5", "YAML syntax error"),
    ("bad-indentation", "name: a\n  seed: 1\n", "study.yaml:2:7", "mapping values are not allowed here"),
    ("object-tag", 'name: !!python/object/apply:os.system ["echo hi"]\n', "study.yaml:1:7",
     "could not determine a constructor for the tag"),
    ("empty-file", "", "study.yaml", "the study file is empty"),
    ("only-comments", "# nothing here\n", "study.yaml", "the study file is empty"),
    ("not-a-mapping", "- name: a\n", "study.yaml", "a study file is a mapping of keys (got list)"),
]


@pytest.mark.parametrize(("text", "where", "phrase"), [pytest.param(*row[1:], id=row[0]) for row in YAML_TABLE])
def test_yaml_problems_name_file_line_and_column(tmp_path: Path, text: str, where: str, phrase: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert _has(info.value.problems, f"{tmp_path / where}", phrase), info.value.problems
    assert len(info.value.problems) == 1


def test_missing_file_is_one_problem_line(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.problems == [f"{path}: no such study file"]


def test_a_folder_is_not_a_study_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert _has(info.value.problems, str(tmp_path), "cannot read the study file")


def test_object_tag_is_rejected_without_running_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "ran"
    path = _write(tmp_path, f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert "could not determine a constructor" in result.output
    assert "Traceback" not in result.output
    assert not marker.exists()


def test_yaml_1_2_floats_in_a_file(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads `1e-3` as a string; a study file reads it as the float users mean."""
    path = _write(tmp_path, "name: f\ndata: {dataset: digits}\ntrain: {lr: 1e-3, weight_decay: 5e-4}\n"
                            "objective: {metric: val_loss, direction: minimize}\n"
                            "search:\n  train.weight_decay: {type: float, low: 1e-6, high: 1e-2, log: true}\n")
    spec = load_spec(path)
    assert spec.train.lr == 1e-3 and isinstance(spec.train.lr, float)
    assert spec.train.weight_decay == 5e-4
    dim = spec.search["train.weight_decay"]
    assert isinstance(dim, FloatDim) and (dim.low, dim.high) == (1e-6, 1e-2)
    assert parse_yaml("a: 1e-3\nb: 3\nc: .5\nd: -2E+2\n") == {"a": 1e-3, "b": 3, "c": 0.5, "d": -200.0}
    assert isinstance(parse_yaml("b: 3\n")["b"], int)


# ---------------------------------------------------------------- many mistakes at once

FIVE_MISTAKES = """\
# five mistakes, one per section
name: five
data: {dataset: mnist, val_fraction: 1.5}
model: {depht: 3}
train: {optimizer: adamm}
search:
  train.lr: {type: float, low: 0, high: 0.1, log: true}
objective: {metric: val_acc, direction: maximize}
"""
FIVE_PATHS = {
    "data.val_fraction": "must be < 1",
    "model.depht": "unknown key",
    "train.optimizer": "must be one of",
    "search.train.lr.low": "must be > 0 when log is true",
    "objective.metric": "never reports",
}


def test_a_file_with_five_mistakes_gives_five_lines(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(_write(tmp_path, FIVE_MISTAKES))
    problems = info.value.problems
    assert len(problems) == 5, problems
    for path, phrase in FIVE_PATHS.items():
        assert _has(problems, path, phrase), (path, problems)
    assert str(info.value) == "\n".join(problems)


def test_cli_prints_the_five_lines_and_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, FIVE_MISTAKES)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = result.output.splitlines()
    assert len(lines) == 5, result.output
    for path_, phrase in FIVE_PATHS.items():
        assert _has(lines, path_, phrase), (path_, lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]  # bad input writes nothing


def test_cli_bad_set_exits_2_with_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["validate", str(STUDIES[0]), "--set", "train.epochs"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.output.startswith("--set train.epochs: expected PATH=VALUE")


# ---------------------------------------------------------------- --set overrides

MNIST = REPO / "studies" / "mnist.yaml"


def test_set_int() -> None:
    spec = load_spec(MNIST, ["train.epochs=3"])
    assert spec.train.epochs == 3 and isinstance(spec.train.epochs, int)
    assert spec.overrides == ("train.epochs=3",)
    assert load_spec(MNIST).train.epochs == 20  # the file is untouched


def test_set_float_reads_yaml_1_2_exponents() -> None:
    spec = load_spec(MNIST, ["train.lr=1e-2"])
    assert spec.train.lr == 0.01 and isinstance(spec.train.lr, float)


def test_set_string_and_null() -> None:
    spec = load_spec(MNIST, ["model.norm=batch", "data.subset=null"])
    assert spec.model.norm == "batch"
    assert spec.data.subset is None
    assert load_spec(MNIST, ["data.subset=500"]).data.subset == 500


def test_set_nested_key() -> None:
    spec = load_spec(MNIST, ["train.early_stopping.patience=2"])
    assert spec.train.early_stopping.patience == 2
    assert spec.train.early_stopping.min_delta == 0.0


def test_setting_a_searched_key_pins_it() -> None:
    assert "train.lr" in load_spec(MNIST).search
    spec = load_spec(MNIST, ["train.lr=0.05"])
    assert spec.train.lr == 0.05
    assert "train.lr" not in spec.search
    assert "train.batch_size" in spec.search  # only the pinned key leaves the search


def test_set_edits_one_field_of_a_dotted_search_key() -> None:
    spec = load_spec(MNIST, ["search.train.lr.high=0.5"])
    dim = spec.search["train.lr"]
    assert (dim.low, dim.high, dim.log) == (1e-4, 0.5, True)


def test_set_adds_a_search_dimension() -> None:
    spec = load_spec(MNIST, ["search.model.width={type: int, low: 16, high: 64}"])
    assert (spec.search["model.width"].low, spec.search["model.width"].high) == (16, 64)


def test_set_values_are_validated_like_the_file() -> None:
    assert _has(_problems(_study(), ("train.epochs=ten",)), "train.epochs", "must be an integer (got 'ten')")
    assert _has(_problems(_study(), ("train.epoch=3",)), "train.epoch", "did you mean epochs?")
    assert _has(_problems(_study(), ("search.train.lr.low=0",)), "search.train.lr.low", "when log is true")


@pytest.mark.parametrize(
    ("override", "path", "phrase"),
    [
        pytest.param("train.epochs", "--set train.epochs", "expected PATH=VALUE", id="no-equals"),
        pytest.param("=3", "--set =3", "expected PATH=VALUE", id="no-path"),
        pytest.param("train.epochs=[1", "--set train.epochs", "cannot parse the value '[1'", id="bad-yaml"),
        pytest.param("data.dataset.x=3", "--set data.dataset.x", "data.dataset is not a section", id="into-a-value"),
    ],
)
def test_bad_set_is_a_problem_line(override: str, path: str, phrase: str) -> None:
    problems = _problems(_study(), (override,))
    assert _has(problems, path, phrase), problems


def test_bad_set_is_reported_with_the_files_own_problems() -> None:
    problems = _problems(_study({("train", "epochs"): 0}), ("nonsense",))
    assert _has(problems, "--set nonsense", "expected PATH=VALUE")
    assert _has(problems, "train.epochs", "must be > 0")


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["../../x", "..", "/etc/passwd", "a b/c\\d", ".hidden", "-x-"])
def test_slug_cannot_escape_or_hide(name: str) -> None:
    study = _study({("name",): name})
    study["tracking"] = {"register_best": False}  # the Model Registry refuses '/' in names (tested below)
    slug = spec_from_dict(study).slug
    assert slug
    assert "/" not in slug and "\\" not in slug
    assert not slug.startswith(".")
    assert slug not in (".", "..")
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", slug)


def test_registry_refuses_a_name_with_a_slash_at_validation() -> None:
    with pytest.raises(SpecError) as err:
        spec_from_dict(_study({("name",): "../../x"}))
    assert any(p.startswith("name: the Model Registry cannot hold") for p in err.value.problems)


def test_slug_keeps_a_plain_name() -> None:
    assert spec_from_dict(_study({("name",): "mnist-mlp_v2.1"})).slug == "mnist-mlp_v2.1"


def test_spec_is_frozen() -> None:
    spec = spec_from_dict(_study())
    assert isinstance(spec, StudySpec)
    with pytest.raises(Exception):
        spec.train.epochs = 3  # type: ignore[misc]
