"""Bring your own code: entry points, custom data, custom models and custom trainables.

The fast tests resolve entry points and run the user's code in-process; the slow ones run each
entry point end to end through `dlsearch run` on real Ray Tune, Optuna storage and MLflow (one
local Ray shared by the module, so that its start-up is paid once).
"""

from __future__ import annotations

import json
import math
import re
import textwrap
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient
from optuna.trial import TrialState

from dlsearch.cli.commands import main
from dlsearch.config.trial_config import trial_config
from dlsearch.trial.custom_trainable import run_custom_trainable
from dlsearch.trial.data import DataBundle, DataError, DatasetBundle, load_data
from dlsearch.config.entrypoints import resolve
from dlsearch.trial.models import build_model
from dlsearch.config.spec import SpecError, load_spec
from dlsearch.config.stores import tracking_uri
from dlsearch.trial.train import TrialPruned, train_trial

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "studies"
SHARED_DATA = REPO.parent / "shared" / "data"


def unique(prefix: str) -> str:
    """A module name no other test (or Ray worker kept alive between tests) has imported."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def write_module(folder: Path, name: str, source: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    return name


def write_study(folder: Path, name: str = "study.yaml", **sections: Any) -> Path:
    study: dict[str, Any] = {
        "name": unique("custom"),
        "data": {"dataset": "digits"},
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "search": {"train.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True}},
    }
    study.update(sections)
    path = folder / name
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def problems_of(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    return info.value.problems


FACTORIES = """
    import numpy as np
    import torch
    from torch import nn

    def tensors(data, seed):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(300, 6)).astype(np.float64)  # converted to float32
        y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
        x[:, :2] += 2.0 * y[:, None]                      # separable: a model can learn it
        return (x[:200], y[:200]), (x[200:250], y[200:250]), (x[250:], y[250:])

    class Points(torch.utils.data.Dataset):
        classes = ["below", "above"]

        def __init__(self, x, y):
            self.x, self.y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i], int(self.y[i])

    def datasets(data, seed):
        train, val, test = tensors(data, seed)
        return {"train": Points(*train), "val": Points(*val), "test": test}  # a pair may sit beside Datasets

    def mlp(model, input_shape, n_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), model["hidden"]), nn.ReLU(),
                             nn.Linear(model["hidden"], n_classes))

    def not_a_module(model, input_shape, n_classes):
        return "a string"
"""


# ---------------------------------------------------------------- resolving entry points


def test_entry_points_resolve_from_the_study_folder_then_the_cwd_then_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = unique("where")
    write_module(tmp_path / "study", name, "def load(data, seed):\n    return 'study folder'\n")
    write_module(tmp_path / "cwd", name, "def load(data, seed):\n    return 'cwd'\n")
    only_cwd, installed = unique("only_cwd"), unique("installed")
    write_module(tmp_path / "cwd", only_cwd, "def load(data, seed):\n    return 'cwd'\n")
    write_module(tmp_path / "site", installed, "def load(data, seed):\n    return 'installed'\n")
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve(f"{name}:load", "data.factory", tmp_path / "study")({}, 0) == "study folder"
    assert resolve(f"{only_cwd}:load", "data.factory", tmp_path / "study")({}, 0) == "cwd"
    assert resolve(f"{installed}:load", "data.factory", tmp_path / "study")({}, 0) == "installed"
    assert resolve("dlsearch.trial.train:train_trial", "trainable")  # an installed package's function


BAD_ENTRY_POINTS = [
    # (what the module holds, the reference, the rule the line must state)
    ("", "no_such_module_xyz:load",
     "cannot import 'no_such_module_xyz': ModuleNotFoundError: No module named 'no_such_module_xyz'; looked in"),
    ("def load(data, seed): pass", "{m}:lode", "has no attribute 'lode'"),
    ("load = 3", "{m}:load", "is not callable (got a int)"),
    ("def load(data): pass", "{m}:load", "must take 2 positional arguments (data, seed); its signature is (data)"),
    ("def load(data, seed:\n", "{m}:load", "cannot import '{m}': SyntaxError"),
    ("raise RuntimeError('no GPU here')", "{m}:load", "cannot import '{m}': RuntimeError: no GPU here"),
    ("", "not a reference", 'must be "package.module:function"'),
]


@pytest.mark.parametrize("source, ref, rule", BAD_ENTRY_POINTS, ids=lambda v: str(v)[:24])
def test_a_bad_data_factory_is_one_line_naming_the_key_and_the_error(
    tmp_path: Path, source: str, ref: str, rule: str
) -> None:
    module = write_module(tmp_path, unique("bad"), source)
    study = write_study(tmp_path, data={"dataset": "custom", "factory": ref.format(m=module)})
    problems = problems_of(study)
    assert len(problems) == 1, problems
    assert problems[0].startswith("data.factory: ") and rule.format(m=module) in problems[0], problems


def test_every_entry_point_is_checked_with_its_own_signature_and_all_problems_come_at_once(tmp_path: Path) -> None:
    module = write_module(tmp_path, unique("sig"), """
        def two(a, b): pass
        def three(a, b, c): pass
    """)
    study = write_study(
        tmp_path,
        data={"dataset": "custom", "factory": f"{module}:three"},
        model={"kind": "custom", "factory": f"{module}:two"},
        trainable=f"{module}:missing",
        train={"lr": -1.0},
    )
    problems = problems_of(study)
    assert any(p.startswith("data.factory: ") and "must take 2 positional arguments (data, seed)" in p
               for p in problems)
    assert any(p.startswith("model.factory: ") and "must take 3 positional arguments (model, input_shape, n_classes)"
               in p for p in problems)
    assert any(p.startswith("trainable: ") and "has no attribute 'missing'" in p for p in problems)
    assert any(p.startswith("train.lr: ") for p in problems)  # the other rules still speak


def test_validate_exits_2_with_a_line_naming_the_key_for_a_module_that_does_not_exist(tmp_path: Path) -> None:
    study = write_study(tmp_path, model={"kind": "custom", "factory": "myproj_nowhere.nets:build"})
    result = CliRunner().invoke(main, ["validate", str(study)])
    assert result.exit_code == 2
    assert result.output.startswith("model.factory: cannot import 'myproj_nowhere.nets': ModuleNotFoundError")
    assert "Traceback" not in result.output
    # the same through --set, and a searched factory's every choice is checked
    result = CliRunner().invoke(main, ["validate", str(study), "--set", "model.factory=dlsearch.trial.models:build_model"])
    assert result.exit_code == 0, result.output
    searched = write_study(tmp_path, name="searched.yaml",
                           model={"kind": "custom", "factory": "dlsearch.trial.models:build_model"},
                           search={"model.factory": {"type": "categorical",
                                                     "choices": ["dlsearch.trial.models:build_model", "nowhere_y:net"]}})
    problems = problems_of(searched)
    assert any(p.startswith("search.model.factory.choices[1]: cannot import 'nowhere_y'") for p in problems)


def test_factories_belong_to_custom_sections_and_custom_sections_need_one(tmp_path: Path) -> None:
    study = write_study(tmp_path, data={"dataset": "digits", "factory": "dlsearch.trial.data:load_data"},
                        model={"kind": "custom"})
    problems = problems_of(study)
    assert "data.factory: is used only with dataset custom (got dataset digits)" in problems
    assert any(p.startswith("model.factory: is required for kind custom") for p in problems)


# ---------------------------------------------------------------- custom data and models


def test_a_factory_returning_arrays_gives_the_in_memory_bundle(tmp_path: Path) -> None:
    module = write_module(tmp_path, unique("data"), FACTORIES)
    study = write_study(tmp_path, data={"dataset": "custom", "factory": f"{module}:tensors", "noise": 0.1},
                        search={"data.noise": {"type": "float", "low": 0.0, "high": 1.0}})
    spec = load_spec(study)
    cfg = trial_config(spec, {"data.noise": 0.5}, 0)
    assert cfg.data.model_dump()["noise"] == 0.5 and cfg.flat()["data.noise"] == 0.5  # passed through, logged
    bundle = load_data(cfg.data, cfg.data_seed, base_dir=cfg.base_dir)
    assert isinstance(bundle, DataBundle)
    assert (bundle.input_shape, bundle.n_classes, len(bundle.y_train), len(bundle.y_test)) == ((6,), 2, 200, 50)
    assert bundle.x_train.dtype == torch.float32 and bundle.y_train.dtype == torch.int64


def test_a_factory_returning_datasets_trains_through_loader_workers_and_resumes_exactly(tmp_path: Path) -> None:
    module = write_module(tmp_path, unique("data"), FACTORIES)
    study = write_study(
        tmp_path, data={"dataset": "custom", "factory": f"{module}:datasets", "n_workers": 1},
        model={"kind": "custom", "factory": f"{module}:mlp", "hidden": 16},
        train={"epochs": 4, "batch_size": 32, "lr": 0.03, "early_stopping": {"patience": 10}},
    )
    cfg = trial_config(load_spec(study), {}, 0)
    bundle = load_data(cfg.data, cfg.data_seed, base_dir=cfg.base_dir)
    assert isinstance(bundle, DatasetBundle)
    assert (bundle.input_shape, bundle.n_classes) == ((6,), 2)  # n_classes from the Dataset's `classes`
    checkpoints: dict[int, dict] = {}
    result = train_trial(cfg, bundle, lambda e, m, checkpoint=None: checkpoints.setdefault(e, checkpoint))
    assert result.state == "COMPLETE" and result.best_metrics["val_accuracy"] > 0.8
    assert result.test_accuracy is not None and result.test_accuracy > 0.8
    resumed = train_trial(cfg, bundle, resume=checkpoints[2])  # the loader's shuffle order is restored too
    assert len(resumed.history) == len(result.history) == 4
    for again, first in zip(resumed.history, result.history):
        timeless = {k: v for k, v in first.items() if k != "epoch_time_s"}
        assert {k: again[k] for k in timeless} == pytest.approx(timeless, rel=1e-5)


BAD_RETURNS = [
    ("[1, 2]", "must return (train, val, test)"),
    ("{'train': (x, y), 'val': (x, y)}", "missing test"),
    ("((x, y[:5]), (x, y), (x, y))", "the train split's y must have shape (10,)"),
    ("((x[:, 0], y), (x, y), (x, y))", "the train split's x must have shape (N, *input_shape)"),
    ("((x, y - 1), (x, y), (x, y))", "labels must be class indices 0..K-1 (found -1)"),
    ("(It(), It(), It())", "IterableDataset"),
    ("(Ds(), Ds(), Ds())", "without a class count"),
]


@pytest.mark.parametrize("returned, rule", BAD_RETURNS, ids=[r for _, r in BAD_RETURNS])
def test_what_a_data_factory_returns_is_checked(tmp_path: Path, returned: str, rule: str) -> None:
    module = write_module(tmp_path, unique("ret"), f"""
        import torch
        x, y = torch.zeros(10, 3), torch.arange(10) % 2

        class It(torch.utils.data.IterableDataset):
            def __iter__(self):
                return iter([])

        class Ds(torch.utils.data.Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, i):
                return torch.zeros(3), 0

        def load(data, seed):
            return {returned}
    """)
    cfg = trial_config(load_spec(write_study(tmp_path, data={"dataset": "custom", "factory": f"{module}:load"})), {})
    with pytest.raises(DataError) as info:
        load_data(cfg.data, cfg.data_seed, base_dir=cfg.base_dir)
    assert str(info.value).startswith("data.factory: ") and rule in str(info.value)


def test_a_custom_model_gets_its_section_and_keeps_its_init_unless_the_study_names_one(tmp_path: Path) -> None:
    module = write_module(tmp_path, unique("model"), FACTORIES)
    spec = load_spec(write_study(tmp_path, model={"kind": "custom", "factory": f"{module}:mlp", "hidden": 24}))
    assert spec.model.init == "default"
    torch.manual_seed(0)
    kept = build_model(spec.model, (6,), 3, base_dir=str(tmp_path))
    torch.manual_seed(0)
    reference = resolve(f"{module}:mlp", "model.factory")({"hidden": 24}, (6,), 3)
    assert kept[1].out_features == 24 and kept[3].out_features == 3
    assert torch.equal(kept[1].weight, reference[1].weight)  # the factory's own init
    torch.manual_seed(0)
    reinit = build_model(spec.model.model_copy(update={"init": "orthogonal"}), (6,), 3, base_dir=str(tmp_path))
    w = reinit[1].weight
    assert not torch.equal(w, reference[1].weight)
    assert torch.allclose(w.T @ w, (w.T @ w).diag().diag(), atol=1e-4)  # orthogonal columns (24 x 6)
    bad = spec.model.model_copy(update={"factory": f"{module}:not_a_module"})
    with pytest.raises(TypeError, match=r"model.factory: must return a torch.nn.Module \(got a str"):
        build_model(bad, (6,), 3, base_dir=str(tmp_path))


def test_a_custom_model_trains_in_the_built_in_loop_on_built_in_data(tmp_path: Path) -> None:
    module = write_module(tmp_path, unique("model"), FACTORIES)
    study = write_study(tmp_path, model={"kind": "custom", "factory": f"{module}:mlp", "hidden": 32},
                        train={"epochs": 3, "batch_size": 64, "lr": 0.01})
    result = CliRunner().invoke(main, ["train", str(study), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["state"] == "COMPLETE" and summary["best_metrics"]["val_accuracy"] > 0.7
    sanity = CliRunner().invoke(main, ["sanity", str(study), "--steps", "100"])
    assert sanity.exit_code == 0 and "sanity passed" in sanity.output


# ---------------------------------------------------------------- custom trainables in-process


TRAINABLE = """
    import math
    from dlsearch.trial.train import TrialPruned

    events = []

    def fit(config, report):
        mode = config["model"]["mode"]
        state = report.last_checkpoint()
        start = state["epoch"] + 1 if state else 1
        try:
            for epoch in range(start, config["train"]["epochs"] + 1):
                loss = float("nan") if mode == "nan" and epoch == 3 else 1.0 / epoch
                if mode == "raises" and epoch == 2:
                    raise ValueError("the user's bug")
                try:
                    report(epoch, {"loss": loss, "start": start}, checkpoint={"epoch": epoch})
                except TrialPruned:
                    if mode != "swallow":
                        raise
        finally:
            events.append(("finally", mode))
        return {"test_accuracy": 0.75, "extra": 2}

    def silent(config, report):
        report(1, {"other": 1.0})
"""


def trainable_config(tmp_path: Path, fn: str = "fit", mode: str = "ok", epochs: int = 4) -> Any:
    module = write_module(tmp_path, unique("fit"), TRAINABLE)
    study = write_study(tmp_path, trainable=f"{module}:{fn}", data={"dataset": "custom"},
                        model={"kind": "custom", "mode": mode}, train={"epochs": epochs},
                        objective={"metric": "loss", "direction": "minimize"},
                        search={"model.mode": {"type": "categorical", "choices": ["ok", "nan"]}})
    return trial_config(load_spec(study), {}, 0), module


def test_a_trainable_reports_through_the_loops_report_and_returns_final_metrics(tmp_path: Path) -> None:
    cfg, _ = trainable_config(tmp_path)
    seen: list[tuple[int, dict, Any]] = []
    result = run_custom_trainable(cfg, lambda e, m, checkpoint=None: seen.append((e, dict(m), checkpoint)))
    assert [e for e, _, _ in seen] == [1, 2, 3, 4]
    assert all(set(m) == {"loss", "start", "epoch_time_s"} for _, m, _ in seen)  # epoch_time_s added
    assert seen[-1][2]["custom"] == {"epoch": 4}  # the user's checkpoint, wrapped with the curve so far
    assert result.state == "COMPLETE" and result.best_epoch == 4 and result.best_metrics["loss"] == 0.25
    assert result.test_accuracy == 0.75 and result.final_metrics == {"extra": 2.0}
    # resuming from epoch 2's checkpoint: last_checkpoint() hands it back and the trainable goes on from there
    again: list[int] = []
    resumed = run_custom_trainable(cfg, lambda e, m, checkpoint=None: again.append(e), resume=seen[1][2])
    assert again == [3, 4] and resumed.epochs_run == 4 and resumed.history[-1]["start"] == 3
    assert [h["loss"] for h in resumed.history] == [1.0, 0.5, 1 / 3, 0.25]


def test_pruning_stops_a_trainable_even_one_that_swallows_the_signal(tmp_path: Path) -> None:
    for mode in ("ok", "swallow"):
        cfg, module = trainable_config(tmp_path / mode, mode=mode)

        def pruner(epoch: int, metrics: dict, checkpoint: Any = None) -> None:
            if epoch == 2:
                raise TrialPruned("below the median at epoch 2")

        with pytest.raises(TrialPruned, match="below the median"):
            run_custom_trainable(cfg, pruner)
        import sys

        assert ("finally", mode) in sys.modules[module].events  # it stopped cleanly: its finally block ran


def test_a_nan_objective_fails_the_trial_and_an_exception_propagates(tmp_path: Path) -> None:
    cfg, _ = trainable_config(tmp_path / "nan", mode="nan")
    result = run_custom_trainable(cfg, None)
    assert result.state == "FAIL" and result.epochs_run == 2
    assert result.fail_reason.startswith("loss became nan at epoch 3")
    cfg, _ = trainable_config(tmp_path / "raises", mode="raises")
    with pytest.raises(ValueError, match="the user's bug"):
        run_custom_trainable(cfg, None)
    cfg, _ = trainable_config(tmp_path / "silent", fn="silent")
    result = run_custom_trainable(cfg, None)
    assert result.state == "FAIL" and "never reported the objective 'loss' (it reported: epoch_time_s, other)" \
        in result.fail_reason


def test_train_runs_a_trainable_in_process_and_sanity_refuses_it(tmp_path: Path) -> None:
    trainable_config(tmp_path)  # writes study.yaml
    study = tmp_path / "study.yaml"
    result = CliRunner().invoke(main, ["train", str(study), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["state"] == "COMPLETE" and summary["epochs_run"] == 4
    assert summary["best_metrics"]["loss"] == 0.25 and summary["final_metrics"] == {"extra": 2.0}
    nan = CliRunner().invoke(main, ["train", str(study), "--set", "model.mode=nan"])
    assert nan.exit_code == 1 and "FAIL after 2 epochs: loss became nan at epoch 3" in nan.output
    sanity = CliRunner().invoke(main, ["sanity", str(study)])
    assert sanity.exit_code == 2 and sanity.output.startswith("trainable: sanity checks the built-in training loop")


def test_report_rejects_what_cannot_become_a_curve(tmp_path: Path) -> None:
    module = write_module(tmp_path, unique("bad_report"), """
        def fit(config, report):
            report(1, config["model"]["metrics"])
    """)
    for metrics, rule in (({"loss": "low"}, "metric 'loss' must be a number (got 'low')"),
                          ({"epoch": 1.0}, "metric name 'epoch' is reserved"),
                          ({"a,b": 1.0}, "not a valid MLflow metric name")):
        study = write_study(tmp_path, trainable=f"{module}:fit", data={"dataset": "custom"},
                            model={"kind": "custom", "metrics": metrics},
                            objective={"metric": "loss", "direction": "minimize"})
        with pytest.raises((TypeError, ValueError), match=re.escape(rule)):
            run_custom_trainable(trial_config(load_spec(study), {}), None)


def test_a_cluster_gets_the_study_folder_and_local_packages_and_a_local_run_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dlsearch.backend.cluster import cluster_runtime_env

    assert cluster_runtime_env(load_spec(STUDIES / "digits.yaml")) is None  # no user code to ship
    env = cluster_runtime_env(load_spec(STUDIES / "custom_cnn.yaml"))
    assert env["working_dir"] == str(STUDIES) and "py_modules" not in env
    package = unique("myproj")
    write_module(tmp_path / "cwd" / package, "__init__", "")
    write_module(tmp_path / "cwd" / package, "nets", FACTORIES)
    monkeypatch.chdir(tmp_path / "cwd")
    (tmp_path / "studies").mkdir()
    study = write_study(tmp_path / "studies", model={"kind": "custom", "factory": f"{package}.nets:mlp", "hidden": 4},
                        trainable="dlsearch.trial.train:train_trial")  # installed (here, editable): never shipped
    env = cluster_runtime_env(load_spec(study))
    assert env["working_dir"] == str(tmp_path / "studies")
    assert env["py_modules"] == [str(tmp_path / "cwd" / package)]


# ---------------------------------------------------------------- end to end: dlsearch run


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for the module's runs (run_study uses a Ray it finds initialized, and leaves it)."""
    import logging

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def run_cli(study: Path, *overrides: str) -> Any:
    args = ["run", str(study)]
    for item in overrides:
        args += ["--set", item]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result


def stored(study: Path, overrides: tuple[str, ...] = ()) -> tuple[Any, list, dict[int, Any], MlflowClient]:
    """The spec (with the run's overrides), Optuna's trials, the MLflow child runs by trial number, the client."""
    spec = load_spec(study, overrides)
    # Absolute URIs: MLflow caches a store by its URI, and each test has its own working directory.
    trials = optuna.load_study(study_name=spec.name, storage=tracking_uri(spec.tracking.optuna_storage)).trials
    client = MlflowClient(tracking_uri=tracking_uri(spec.tracking.uri))
    experiment = client.get_experiment_by_name(spec.name)
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    children = {int(r.data.tags["dlsearch.trial_number"]): r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    return spec, trials, children, client


def artifacts(client: MlflowClient, run: Any, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run.info.run_id, path)}


@pytest.mark.slow
def test_custom_trainable_study_converges_to_the_known_optimum_and_prunes_bad_trials(
    local_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    monkeypatch.chdir(tmp_path)  # the study's default stores (mlruns/) go here
    study = STUDIES / "custom_trainable.yaml"
    run_cli(study, "budget.trials=24", "resources.max_concurrent=1")  # one at a time: a fixed sequence
    spec, trials, children, client = stored(study)
    f = importlib.import_module("custom_trainable").f  # the objective's floor, from the study's own module
    floors = [f(t.params["model.x"], t.params["model.y"]) for t in trials]

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert len(trials) == 24 and len(complete) + len(pruned) == 24
    # Pruning stops bad trials early: fewer epochs, and worse floors than the trials that ran on.
    assert len(pruned) >= 3
    assert all(len(t.intermediate_values) < spec.train.epochs for t in pruned)
    assert np.median([floors[t.number] for t in pruned]) > np.median([floors[t.number] for t in complete])
    # The search converges toward the optimum: later trials sample closer, the best lands near it.
    assert np.median(floors[-8:]) < np.median(floors[:8]) / 3
    best = min(complete, key=lambda t: t.value)
    assert best.value < 1.0
    assert math.dist((best.params["model.x"], best.params["model.y"]), (1.5, -0.5)) < 0.6

    for t in trials:
        run = children[t.number]
        assert run.data.tags["dlsearch.state"] == t.state.name and run.info.status == "FINISHED"
        assert float(run.data.params["model.x"]) == pytest.approx(t.params["model.x"])
        assert run.data.params["model.noise"] == "0.5"  # an unsearched custom key is a param too
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == sorted(t.intermediate_values)
        assert len(client.get_metric_history(run.info.run_id, "floor")) == len(history)
        if t.state == TrialState.COMPLETE:
            assert {"curve.json", "checkpoint", "config.yaml"} <= artifacts(client, run)
            assert artifacts(client, run, "checkpoint") == {"checkpoint/last.pt"}
            assert run.data.metrics["distance_to_optimum"] == pytest.approx(
                math.dist((t.params["model.x"], t.params["model.y"]), (1.5, -0.5)))


FAULTY = """
    import os
    from pathlib import Path

    def fit(config, report):
        mode, folder = config["model"]["mode"], Path(config["model"]["folder"])
        state = report.last_checkpoint()
        start = state["epoch"] + 1 if state else 1
        if state is None:
            note = folder / f"{mode}-note.txt"
            note.write_text(mode)
            report.log_artifact(note)  # before anything goes wrong: it must reach MLflow anyway
        for epoch in range(start, config["train"]["epochs"] + 1):
            if mode == "raises" and epoch == 2:
                raise RuntimeError("the user's bug")
            loss = 100.0 if mode == "pruned" else float("nan") if mode == "nan" and epoch == 2 else 1.0 / epoch
            report(epoch, {"loss": loss, "started_at": start}, checkpoint={"epoch": epoch})
            if mode == "crash_once" and epoch == 3 and not (folder / "crashed").exists():
                (folder / "crashed").write_text("")
                os._exit(1)  # the worker process dies; Ray restarts the trial from epoch 3's checkpoint
        return {"test_accuracy": 0.5}
"""


@pytest.mark.slow
def test_faulty_trainables_end_with_their_reason_and_a_crashed_one_resumes_from_its_checkpoint(
    local_ray: None, tmp_path: Path
) -> None:
    module = write_module(tmp_path, unique("faulty"), FAULTY)
    modes = ["ok", "raises", "nan", "pruned", "crash_once"]
    study = write_study(
        tmp_path, trainable=f"{module}:fit", data={"dataset": "custom"},
        model={"kind": "custom", "mode": "ok", "folder": str(tmp_path)}, train={"epochs": 5},
        search={"model.mode": {"type": "categorical", "choices": modes}},
        objective={"metric": "loss", "direction": "minimize"}, sampler={"type": "grid"},
        pruner={"type": "threshold", "upper": 50.0, "n_warmup_steps": 1}, budget={"trials": len(modes)},
        resources={"cpus_per_trial": 1, "max_concurrent": 2, "max_failures": 2},
        tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifacts": str(tmp_path / "artifacts"),
                  "optuna_storage": f"sqlite:///{tmp_path}/optuna.db", "register_best": True},
    )
    run_cli(study)
    spec, trials, children, client = stored(study)
    by_mode = {t.params["model.mode"]: t for t in trials}
    assert sorted(by_mode) == sorted(modes)
    expected = {"ok": TrialState.COMPLETE, "crash_once": TrialState.COMPLETE, "pruned": TrialState.PRUNED,
                "raises": TrialState.FAIL, "nan": TrialState.FAIL}
    for mode, t in by_mode.items():
        run = children[t.number]
        assert t.state == expected[mode], (mode, t.user_attrs)
        assert run.data.tags["dlsearch.state"] == t.state.name
        assert f"{mode}-note.txt" in artifacts(client, run), mode  # logged artifacts land whatever the end
    assert by_mode["raises"].user_attrs["fail_reason"] == "RuntimeError: the user's bug"
    # In MLflow the user's own exception keeps its traceback, after the reason (issue: hostile inputs).
    tag = children[by_mode["raises"].number].data.tags["dlsearch.fail_reason"]
    assert tag.startswith("RuntimeError: the user's bug\n\nTraceback (most recent call last):") and "fit" in tag
    assert by_mode["nan"].user_attrs["fail_reason"].startswith("loss became nan at epoch 2")
    assert children[by_mode["nan"].number].info.status == "FAILED"
    assert sorted(by_mode["pruned"].intermediate_values) == [1]  # stopped at the first step past warmup
    # The crashed trial: restarted from epoch 3's checkpoint, every epoch logged once, final metrics kept.
    crashed = by_mode["crash_once"]
    assert (tmp_path / "crashed").exists()
    assert sorted(crashed.intermediate_values) == [1, 2, 3, 4, 5]
    run = children[crashed.number]
    started = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "started_at"))
    assert started == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 4.0), (5, 4.0)]
    assert run.data.metrics["test_accuracy"] == 0.5 and crashed.user_attrs["test_accuracy"] == 0.5
    assert by_mode["ok"].value == pytest.approx(0.2)
    # a custom trainable's model is its own: nothing goes to the Model Registry
    assert not client.search_registered_models(f"name = '{spec.name}'")


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="MNIST is read from ../shared/data")
def test_custom_cnn_study_trains_the_users_model_and_registers_it(
    local_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.chdir(tmp_path)
    study = STUDIES / "custom_cnn.yaml"
    # data.root, not $DLSEARCH_DATA_DIR: the module's Ray workers started before this test could set it.
    overrides = (f"data.root={SHARED_DATA / 'mnist'}", "budget.trials=2", "data.subset=600", "train.epochs=2",
                 "model.filters=4", "model.stages=1")
    run_cli(study, *overrides)
    spec, trials, children, client = stored(study, overrides)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:
        run = children[t.number]
        params = run.data.params
        assert (params["model.factory"], params["model.filters"], params["model.stages"]) == (
            "custom_cnn:build", "4", "1")
        assert float(params["model.dropout"]) == pytest.approx(t.params["model.dropout"])
        assert params["model.init"] == t.params["model.init"]
        assert "checkpoint/best.pt" in artifacts(client, run, "checkpoint")
        assert 0.0 < run.data.metrics["test_accuracy"] <= 1.0
    version = client.get_model_version_by_alias(spec.name, "best")
    best = min(trials, key=lambda t: -t.value)
    assert version.run_id == best.user_attrs["mlflow_run_id"]
    # The registered model is the user's network with the best trial's weights.
    registered = mlflow.pytorch.load_model(f"models:/{spec.name}@best")
    cfg = trial_config(spec, best.params, best.number)
    mine = build_model(cfg.model, (1, 28, 28), 10, base_dir=cfg.base_dir)
    mine.load_state_dict(torch.load(best.user_attrs["checkpoint"]))
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(registered(x), mine.eval()(x), atol=1e-5)


@pytest.mark.slow
def test_custom_csv_study_reads_its_dataset_in_loader_workers(
    local_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    study = STUDIES / "custom_csv.yaml"
    run_cli(study, "budget.trials=3", "train.epochs=6", "data.n_workers=1", "tracking.register_best=false")
    _, trials, children, client = stored(study)
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        run = children[t.number]
        assert run.data.params["data.normalize"] == str(t.params["data.normalize"])  # a custom key, searched
        assert (run.data.params["data.factory"], run.data.params["data.n_workers"]) == ("custom_csv:load", "1")
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) == len(t.intermediate_values)
        assert 0.0 <= run.data.metrics["test_accuracy"] == t.user_attrs["test_accuracy"] <= 1.0
    assert max(t.user_attrs["test_accuracy"] for t in trials) > 0.6  # 3 cultivars: chance is a third


GREEDY = """
import ray
import torch

def fit(config, report):
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    if cpus < 2:  # a real allocation that fails: 256 TiB, more than any host here
        torch.empty(2**48, dtype=torch.uint8)
    for epoch in (1, 2):
        report(epoch, {"loss": config["train"]["lr"] / epoch, "cpus": cpus})
"""


@pytest.mark.slow
def test_a_trial_out_of_memory_runs_again_with_twice_the_resources(local_ray: None, tmp_path: Path) -> None:
    """The allocation fails for real (host memory: this machine has no GPU to run out of); the trial
    ends FAIL, is not counted in the budget, and runs again with 2 CPUs, so 1 neighbour fewer."""
    module = write_module(tmp_path, unique("greedy"), GREEDY)
    study = write_study(
        tmp_path, trainable=f"{module}:fit", data={"dataset": "custom"}, model={"kind": "custom"},
        objective={"metric": "loss", "direction": "minimize"}, budget={"trials": 2},
        resources={"cpus_per_trial": 1, "max_concurrent": 2},
        tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifacts": str(tmp_path / "artifacts"),
                  "optuna_storage": f"sqlite:///{tmp_path}/optuna.db", "register_best": False},
    )
    result = run_cli(study)
    assert "runs again with 2x" in result.output
    _, trials, children, client = stored(study)
    requeued = [t for t in trials if t.user_attrs.get("requeued")]
    reruns = [t for t in trials if t.user_attrs.get("resources_scale") == 2]
    assert len(trials) == 4 and len(requeued) == 2 and len(reruns) == 2
    for t in requeued:
        assert t.state == TrialState.FAIL and "can't allocate memory" in t.user_attrs["fail_reason"]
        assert children[t.number].data.tags["dlsearch.fail_reason"].startswith("out of memory with 1x")
    assert sorted(t.user_attrs["rerun_of"] for t in reruns) == sorted(t.number for t in requeued)
    for t in reruns:
        assert t.state == TrialState.COMPLETE
        assert children[t.number].data.metrics["cpus"] == 2.0  # Ray gave the rerun both CPUs
        assert t.params == next(r for r in requeued if r.number == t.user_attrs["rerun_of"]).params
    assert "2 trials finished (2 complete, 0 pruned, 0 failed)" in result.output
