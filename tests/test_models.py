"""Tests for dlsearch.models: shapes, parameter counts, init statistics, layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from dlsearch.entrypoints import EntryPointError
from dlsearch.models import build_model, count_parameters, init_weights
from dlsearch.spec import ModelSpec

SHAPES = [(1, 28, 28), (1, 8, 8), (20,)]
ACTIVATIONS = ["relu", "leaky_relu", "gelu", "tanh", "sigmoid"]
# The gain each activation's weights are scaled for (gelu counts as relu).
GAINS = {"relu": math.sqrt(2), "gelu": math.sqrt(2), "leaky_relu": math.sqrt(2 / (1 + 0.01**2)),
         "tanh": 5 / 3, "sigmoid": 1.0}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _big_mlp(init: str, activation: str = "relu") -> nn.Module:
    # One 1000->1000 hidden layer and a 1000->1000 head: enough samples
    # (1e6 weights each) for the empirical std to sit within ~0.1% of its target.
    spec = ModelSpec(kind="mlp", depth=1, width=1000, init=init, activation=activation, dropout=0.0)
    return build_model(spec, (1000,), 1000)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("shape", SHAPES)
def test_mlp_outputs_logits_for_every_input_shape(shape: tuple[int, ...]) -> None:
    model = build_model(ModelSpec(kind="mlp", depth=2, width=32), shape, 10)
    assert model(torch.randn(5, *shape)).shape == (5, 10)


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_cnn_outputs_logits_and_deep_stacks_do_not_collapse(shape: tuple[int, ...], depth: int) -> None:
    model = build_model(ModelSpec(kind="cnn", depth=depth, width=16, channels=4), shape, 10)
    assert model(torch.randn(3, *shape)).shape == (3, 10)


def test_cnn_pools_only_while_the_map_can_be_halved() -> None:
    model = build_model(ModelSpec(kind="cnn", depth=5, channels=2), (1, 8, 8), 10)
    # 8 -> 4 -> 2 -> 1, then two blocks that keep 1x1.
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3


def test_cnn_takes_non_square_multichannel_images() -> None:
    model = build_model(ModelSpec(kind="cnn", depth=3, channels=4), (3, 5, 9), 7)
    assert model(torch.randn(2, 3, 5, 9)).shape == (2, 7)


def test_cnn_rejects_tabular_input_naming_the_shape() -> None:
    with pytest.raises(ValueError, match=r"cnn needs an image input shape.*\(20,\)"):
        build_model(ModelSpec(kind="cnn"), (20,), 4)


def test_custom_kind_resolves_its_factory_and_names_the_key_when_it_cannot() -> None:
    # Custom models end to end: tests/test_custom.py.
    with pytest.raises(EntryPointError, match=r"^model.factory: cannot import 'x.y': ModuleNotFoundError"):
        build_model(ModelSpec(kind="custom", factory="x.y:z"), (20,), 4)


@pytest.mark.parametrize("shape, n_classes", [((), 3), ((0, 4), 3), ((20,), 0)])
def test_bad_shape_or_class_count_is_rejected(shape: tuple[int, ...], n_classes: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        build_model(ModelSpec(kind="mlp"), shape, n_classes)


def test_depth_zero_mlp_is_a_linear_classifier() -> None:
    model = build_model(ModelSpec(kind="mlp", depth=0), (1, 8, 8), 10)
    (linear,) = _linears(model)
    assert (linear.in_features, linear.out_features) == (64, 10)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def test_backward_reaches_every_parameter() -> None:
    model = build_model(ModelSpec(kind="cnn", depth=2, channels=4, norm="batch"), (1, 8, 8), 10)
    nn.functional.cross_entropy(model(torch.randn(8, 1, 8, 8)), torch.arange(8)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("norm, per_layer_norm", [("none", 0), ("batch", 2), ("layer", 2)])
def test_mlp_parameter_count(norm: str, per_layer_norm: int) -> None:
    n_in, width, n_classes = 20, 16, 3
    model = build_model(ModelSpec(kind="mlp", depth=2, width=width, norm=norm), (n_in,), n_classes)
    expected = (
        (n_in * width + width) + (width * width + width)  # hidden Linear layers
        + 2 * per_layer_norm * width  # norm weight and bias per hidden layer
        + (width * n_classes + n_classes)  # head
    )
    assert count_parameters(model) == expected


def test_cnn_parameter_count() -> None:
    k, c, width, n_classes = 3, 4, 16, 10
    model = build_model(
        ModelSpec(kind="cnn", depth=2, channels=c, kernel_size=k, width=width), (1, 8, 8), n_classes
    )
    conv1 = 1 * c * k * k + c  # 8x8 -> pool -> 4x4
    conv2 = c * 2 * c * k * k + 2 * c  # 4x4 -> pool -> 2x2
    dense = (2 * c * 2 * 2) * width + width
    head = width * n_classes + n_classes
    assert count_parameters(model) == conv1 + conv2 + dense + head == 1034


def test_count_parameters_skips_buffers_and_counts_shared_weights_once() -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.BatchNorm1d(3), shared)
    assert count_parameters(model) == 12 + 6  # BatchNorm running stats are buffers


# ---------------------------------------------------------------- init


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kaiming_normal_std_fits_the_activation(activation: str) -> None:
    hidden, head = _linears(_big_mlp("kaiming_normal", activation))
    assert hidden.weight.std().item() == pytest.approx(GAINS[activation] / math.sqrt(1000), rel=0.02)
    assert head.weight.std().item() == pytest.approx(1 / math.sqrt(1000), rel=0.02)  # linear gain
    assert hidden.bias.eq(0).all() and head.bias.eq(0).all()


def test_kaiming_normal_relu_matches_he() -> None:
    hidden, _ = _linears(_big_mlp("kaiming_normal", "relu"))
    assert hidden.weight.std().item() == pytest.approx(math.sqrt(2 / 1000), rel=0.02)
    assert hidden.weight.mean().item() == pytest.approx(0.0, abs=1e-3)


def test_kaiming_uniform_bound_and_std() -> None:
    hidden, head = _linears(_big_mlp("kaiming_uniform", "relu"))
    bound = math.sqrt(2) * math.sqrt(3 / 1000)
    assert hidden.weight.abs().max().item() <= bound
    assert hidden.weight.abs().max().item() == pytest.approx(bound, rel=0.01)
    assert hidden.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert head.weight.std().item() == pytest.approx(1 / math.sqrt(1000), rel=0.02)


@pytest.mark.parametrize("activation", ["relu", "tanh", "leaky_relu"])
def test_xavier_uniform_bound_and_std(activation: str) -> None:
    hidden, head = _linears(_big_mlp("xavier_uniform", activation))
    bound = GAINS[activation] * math.sqrt(6 / (1000 + 1000))
    assert hidden.weight.abs().max().item() <= bound
    assert hidden.weight.abs().max().item() == pytest.approx(bound, rel=0.01)
    assert hidden.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert head.weight.std().item() == pytest.approx(math.sqrt(2 / 2000), rel=0.02)  # linear gain


def test_xavier_normal_std() -> None:
    hidden, head = _linears(_big_mlp("xavier_normal", "gelu"))
    assert hidden.weight.std().item() == pytest.approx(math.sqrt(2) * math.sqrt(2 / 2000), rel=0.02)
    assert head.weight.std().item() == pytest.approx(math.sqrt(2 / 2000), rel=0.02)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_orthogonal_rows_are_orthogonal_with_the_gain(activation: str) -> None:
    hidden, head = _linears(_big_mlp("orthogonal", activation))
    eye = torch.eye(1000)
    assert torch.allclose(hidden.weight @ hidden.weight.T, GAINS[activation] ** 2 * eye, atol=1e-4)
    assert torch.allclose(head.weight @ head.weight.T, eye, atol=1e-4)
    assert hidden.bias.eq(0).all()


def test_conv_weights_get_kaiming_with_fan_in() -> None:
    spec = ModelSpec(kind="cnn", depth=2, channels=64, kernel_size=3, init="kaiming_normal")
    model = build_model(spec, (1, 8, 8), 10)
    conv2 = [m for m in model.modules() if isinstance(m, nn.Conv2d)][1]  # 64 -> 128 channels
    fan_in = 64 * 3 * 3
    assert conv2.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)
    assert conv2.bias.eq(0).all()


@pytest.mark.parametrize("kind, shape", [("mlp", (20,)), ("cnn", (1, 8, 8))])
@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_norm_layers_start_at_identity(kind: str, shape: tuple[int, ...], norm: str) -> None:
    model = build_model(ModelSpec(kind=kind, norm=norm, channels=4, init="orthogonal"), shape, 3)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm))]
    assert norms
    assert all(m.weight.eq(1).all() and m.bias.eq(0).all() for m in norms)


def test_default_init_leaves_pytorch_init_untouched() -> None:
    model = build_model(ModelSpec(kind="mlp", depth=2, width=64, init="default"), (20,), 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init_weights(model, "default", "relu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(linear.bias.ne(0).any() for linear in _linears(model))


def test_init_weights_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="model.init: must be one of"):
        init_weights(nn.Linear(2, 2), "he", "relu")
    with pytest.raises(ValueError, match="model.activation: must be one of"):
        init_weights(nn.Linear(2, 2), "orthogonal", "swish")


# ---------------------------------------------------------------- layers


@pytest.mark.parametrize("kind, shape", [("mlp", (20,)), ("cnn", (1, 8, 8))])
def test_dropout_is_active_in_train_and_off_in_eval(kind: str, shape: tuple[int, ...]) -> None:
    model = build_model(ModelSpec(kind=kind, dropout=0.5, channels=4, width=64), shape, 5)
    x = torch.randn(8, *shape)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    "kind, shape, norm, layer",
    [
        ("mlp", (20,), "batch", nn.BatchNorm1d),
        ("mlp", (20,), "layer", nn.LayerNorm),
        ("cnn", (1, 8, 8), "batch", nn.BatchNorm2d),
        ("cnn", (1, 8, 8), "layer", nn.GroupNorm),
    ],
)
def test_norm_layers_present_when_asked(kind: str, shape: tuple[int, ...], norm: str, layer: type) -> None:
    depth = 3
    model = build_model(ModelSpec(kind=kind, depth=depth, norm=norm, channels=4), shape, 5)
    assert sum(isinstance(m, layer) for m in model.modules()) == depth
    assert model(torch.randn(4, *shape)).shape == (4, 5)
    plain = build_model(ModelSpec(kind=kind, depth=depth, norm="none", channels=4), shape, 5)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm))
                   for m in plain.modules())


@pytest.mark.parametrize("kind, shape", [("mlp", (20,)), ("cnn", (1, 8, 8))])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_works(kind: str, shape: tuple[int, ...], activation: str) -> None:
    expected = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU,
                "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[activation]
    model = build_model(ModelSpec(kind=kind, activation=activation, channels=4), shape, 5)
    acts = [m for m in model.modules() if isinstance(m, expected)]
    assert acts
    if activation == "leaky_relu":
        assert all(m.negative_slope == 0.01 for m in acts)
    out = model(torch.randn(4, *shape))
    assert out.shape == (4, 5) and torch.isfinite(out).all()
