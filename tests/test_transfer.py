"""Tests for transfer learning: loading a source's weights, a new head, freezing, and the transfer study.

The study tests train a real source (an MNIST MLP on a small subset), put it in a real MLflow
store as `run_study` does (a child run with its params and `checkpoint/best.pt`, a registered
model with the alias `best`), and fine-tune it with studies/digits_transfer.yaml.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from dlsearch.cli.commands import main
from dlsearch.config.trial_config import TrialConfig, trial_config
from dlsearch.trial.data import load_data
from dlsearch.trial.models import build_model
from dlsearch.config.spec import ModelSpec, SpecError, load_spec
from dlsearch.tracking.tracker import fetch_checkpoint, with_local_source, with_source_architecture
from dlsearch.trial.train import prepare_model, train_trial
from dlsearch.trial.transfer import SourceError, freeze, load_weights, read_state, set_train_mode

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TRANSFER_STUDY = REPO / "studies" / "digits_transfer.yaml"


def mlp(width: int = 16, depth: int = 2, norm: str = "none") -> torch.nn.Module:
    return build_model(ModelSpec(kind="mlp", depth=depth, width=width, norm=norm), (1, 8, 8), 10)


# ---------------------------------------------------------------- loading and freezing


def test_load_weights_copies_every_tensor_and_draws_a_new_head_for_other_classes() -> None:
    torch.manual_seed(0)
    source = mlp().state_dict()
    torch.manual_seed(1)
    same = mlp()
    assert load_weights(same, source) == []
    assert all(torch.equal(same.state_dict()[k], v) for k, v in source.items())
    three_classes = build_model(ModelSpec(kind="mlp", depth=2, width=16), (1, 8, 8), 3)
    head_before = three_classes.head.weight.detach().clone()
    assert load_weights(three_classes, source) == ["head.weight", "head.bias"]
    assert torch.equal(three_classes.head.weight, head_before)  # the new head keeps its own init
    assert torch.equal(three_classes.state_dict()["hidden.1.linear.weight"], source["hidden.1.linear.weight"])


@pytest.mark.parametrize(("model", "message"), [
    (lambda: mlp(width=32), "shapes differ: hidden.0.linear.weight (16, 64) vs (32, 64)"),
    (lambda: mlp(depth=3), "missing: hidden.2.linear.weight"),
    (lambda: mlp(depth=1), "not in the model: hidden.1.linear.weight"),
])
def test_another_architecture_is_refused_with_what_differs(model, message: str) -> None:
    with pytest.raises(SourceError, match="another architecture") as info:
        load_weights(model(), mlp().state_dict())
    assert message in str(info.value)


def test_freeze_backbone_a_list_or_an_unknown_name() -> None:
    model = mlp()
    assert freeze(model, "backbone") == ["hidden.0.linear.weight", "hidden.0.linear.bias",
                                         "hidden.1.linear.weight", "hidden.1.linear.bias"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    model = mlp()
    assert freeze(model, ["hidden.0"]) == ["hidden.0.linear.weight", "hidden.0.linear.bias"]
    assert freeze(mlp(), "none") == []
    with pytest.raises(SourceError, match=r"model.freeze: no layer named hiden.0 \(layers: head, hidden.0.linear"):
        freeze(mlp(), ["hiden.0"])


def test_frozen_batch_norm_keeps_its_running_statistics_in_training() -> None:
    model = mlp(norm="batch")
    freeze(model, ["hidden.0"])
    set_train_mode(model)
    assert not model.hidden[0].norm.training and model.hidden[1].norm.training
    before = model.hidden[0].norm.running_mean.clone()
    model(torch.randn(32, 1, 8, 8) * 3 + 1)
    assert torch.equal(model.hidden[0].norm.running_mean, before)
    assert not torch.equal(model.hidden[1].norm.running_mean, torch.zeros(16))


def test_read_state_takes_a_state_dict_or_a_checkpoint_and_refuses_anything_else(tmp_path: Path) -> None:
    state = mlp().state_dict()
    torch.save(state, tmp_path / "best.pt")
    torch.save({"epoch": 3, "best_state": state, "model": {}}, tmp_path / "resume.pt")
    torch.save({"lr": 0.1}, tmp_path / "junk.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name in ("best.pt", "resume.pt"):
        assert read_state(tmp_path / name).keys() == state.keys()
    with pytest.raises(SourceError, match="holds no model weights"):
        read_state(tmp_path / "junk.pt")
    with pytest.raises(SourceError, match="cannot read checkpoint"):
        read_state(tmp_path / "text.pt")


def test_validate_names_a_missing_checkpoint_file_and_a_malformed_model_uri() -> None:
    with pytest.raises(SpecError) as info:
        load_spec(TRANSFER_STUDY, ["model.init_from=no/such/best.pt"])
    assert info.value.problems[0].startswith("model.init_from: no checkpoint file 'no/such/best.pt' (looked in ")
    with pytest.raises(SpecError) as info:
        load_spec(TRANSFER_STUDY, ["model.init_from=models:/mnist-mlp"])
    assert info.value.problems == ["model.init_from: a registered model is models:/<name>@<alias> or "
                                   "models:/<name>/<version> (got 'models:/mnist-mlp')"]


def test_a_source_missing_from_the_store_is_exit_2_naming_the_key_and_writes_nothing(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = CliRunner().invoke(main, ["train", str(TRANSFER_STUDY), "--set", f"tracking.uri={uri}"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("model.init_from: models:/mnist-mlp@best is not in ")
    assert "run the source study first" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the transfer study, end to end


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.Tensor]]:
    """An MNIST MLP (width 128) trained on 4,000 images, registered as mnist-mlp@best in a fresh store."""
    if not (SHARED / "mnist").is_dir():
        pytest.skip("no MNIST copy at ../shared/data")
    folder = tmp_path_factory.mktemp("source")
    spec = load_spec(REPO / "studies" / "mnist.yaml", [
        f"data.root={SHARED / 'mnist'}", "data.subset=4000", "train.epochs=2", "model.width=128",
        "model.depth=2", "model.norm=none", "train.device=cpu"])
    cfg = trial_config(spec, {}, number=0)
    result = train_trial(cfg, load_data(cfg.data, cfg.data_seed))
    assert result.state == "COMPLETE" and result.test_accuracy > 0.85
    (folder / "checkpoint").mkdir()
    torch.save(result.best_state, folder / "checkpoint" / "best.pt")
    # What run_study leaves in MLflow for a complete trial, and how register_best registers it.
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("mnist-mlp", artifact_location=str(folder / "artifacts"))
    run = client.create_run(experiment, run_name="trial-0")
    for key, value in cfg.flat().items():
        client.log_param(run.info.run_id, key, str(value))
    client.log_artifacts(run.info.run_id, str(folder / "checkpoint"), artifact_path="checkpoint")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("mnist-mlp")
    version = client.create_model_version("mnist-mlp", f"runs:/{run.info.run_id}/checkpoint", run.info.run_id)
    client.set_registered_model_alias("mnist-mlp", "best", version.version)
    return uri, result.best_state


def transfer_cfg(uri: str, *overrides: str) -> TrialConfig:
    spec = load_spec(TRANSFER_STUDY, [f"tracking.uri={uri}", "train.device=cpu", *overrides])
    spec, changed = with_source_architecture(spec)
    assert changed == {"width": 128}  # the study says 256; the source's width wins
    return with_local_source(trial_config(spec, {}, number=0), uri)


def test_the_registered_source_and_its_run_id_fetch_the_same_checkpoint(source) -> None:
    uri, weights = source
    by_alias = fetch_checkpoint("models:/mnist-mlp@best", uri)
    run_id = MlflowClient(tracking_uri=uri).get_model_version_by_alias("mnist-mlp", "best").run_id
    for path in (by_alias, fetch_checkpoint(run_id, uri), fetch_checkpoint("models:/mnist-mlp/1", uri)):
        state = read_state(path)
        assert all(torch.equal(state[k], v) for k, v in weights.items())
    with pytest.raises(SourceError, match=r"no registered model models:/mnist-mlp@nope in sqlite:///"):
        fetch_checkpoint("models:/mnist-mlp@nope", uri)


def test_transfer_starts_from_the_source_and_beats_scratch_after_one_epoch(source) -> None:
    uri, weights = source
    cfg = transfer_cfg(uri, "train.epochs=1")
    data = load_data(cfg.data, cfg.data_seed)
    assert data.input_shape == (1, 28, 28) and len(data.y_train) == 70
    torch.manual_seed(cfg.seed)
    model = prepare_model(cfg, data.input_shape, data.n_classes, torch.device("cpu"))
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())  # before any training

    transferred = train_trial(cfg, data)
    scratch_cfg = dataclasses.replace(cfg, model=cfg.model.model_copy(update={"init_from": None}))
    scratch = train_trial(scratch_cfg, data)  # same seed, same data, same width
    assert transferred.test_accuracy > scratch.test_accuracy + 0.02, (transferred.test_accuracy,
                                                                      scratch.test_accuracy)


def test_a_frozen_backbone_stays_equal_to_the_source_and_only_the_head_learns(source) -> None:
    uri, weights = source
    cfg = transfer_cfg(uri, "train.epochs=2", "model.freeze=backbone")
    result = train_trial(cfg, load_data(cfg.data, cfg.data_seed))
    assert result.state == "COMPLETE"
    for key, value in weights.items():
        if key.startswith("hidden."):
            assert torch.equal(result.best_state[key], value), key
    assert not torch.equal(result.best_state["head.weight"], weights["head.weight"])


def test_cli_train_says_whose_architecture_it_took_and_trains(source) -> None:
    uri, _ = source
    result = CliRunner().invoke(main, ["train", str(TRANSFER_STUDY), "--set", f"tracking.uri={uri}",
                                       "--set", "train.epochs=1", "--json"])
    assert result.exit_code == 0, result.output
    assert "model: width 128 (the architecture of models:/mnist-mlp@best)" in result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["state"] == "COMPLETE" and summary["test_accuracy"] > 0.5
