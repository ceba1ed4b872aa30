"""Tests for dlsearch.trial.models and dlsearch.trial.sequence_models: shapes, parameter counts, init
statistics, layers, and a short real-MNIST training run of every family."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dlsearch.config.trial_config import trial_config
from dlsearch.trial.data import load_data
from dlsearch.config.entrypoints import EntryPointError
from dlsearch.trial.models import build_model, count_parameters, init_weights
from dlsearch.trial.sequence_models import TOKEN_STD, as_patches, as_sequence
from dlsearch.config.spec import ModelSpec, spec_from_dict
from dlsearch.trial.train import train_trial

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAPES = [(1, 28, 28), (1, 8, 8), (20,)]
KINDS = ["mlp", "cnn", "lstm", "gru", "transformer"]
SEQUENCE_KINDS = ["lstm", "gru", "transformer"]
ACTIVATIONS = ["relu", "leaky_relu", "gelu", "tanh", "sigmoid"]
# The gain each activation's weights are scaled for (gelu counts as relu).
GAINS = {"relu": math.sqrt(2), "gelu": math.sqrt(2), "leaky_relu": math.sqrt(2 / (1 + 0.01**2)),
         "tanh": 5 / 3, "sigmoid": 1.0}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _small(kind: str, **fields: object) -> ModelSpec:
    """A small model of `kind`; `fields` override."""
    return ModelSpec(**{"kind": kind, "depth": 2, "width": 16, "heads": 2, "channels": 4, **fields})


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


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", SEQUENCE_KINDS)
def test_sequence_models_output_logits_for_every_input_shape(kind: str, shape: tuple[int, ...]) -> None:
    model = build_model(_small(kind), shape, 10)
    assert model(torch.randn(5, *shape)).shape == (5, 10)


@pytest.mark.parametrize("kind", SEQUENCE_KINDS)
def test_sequence_models_take_a_steps_by_features_sample(kind: str) -> None:
    model = build_model(_small(kind), (12, 5), 3)  # 12 steps of 5 features
    assert model(torch.randn(4, 12, 5)).shape == (4, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_ends_in_a_linear_head_that_can_be_a_single_logit(kind: str) -> None:
    # Transfer learning freezes every parameter not under `head.` and swaps the head.
    model = build_model(_small(kind, depth=1), (1, 8, 8), 1)
    weighted = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.RNNBase))]
    assert isinstance(model.head, nn.Linear) and weighted[-1] is model.head
    assert [n for n, _ in model.named_parameters() if n.startswith("head.")] == ["head.weight", "head.bias"]
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 1)


def test_mlp_and_cnn_keep_their_state_dict_keys() -> None:
    # Checkpoints and registered models of earlier studies load by these names.
    mlp = build_model(ModelSpec(kind="mlp", depth=1, norm="batch"), (20,), 3)
    assert list(mlp.state_dict()) == [
        "hidden.0.linear.weight", "hidden.0.linear.bias", "hidden.0.norm.weight", "hidden.0.norm.bias",
        "hidden.0.norm.running_mean", "hidden.0.norm.running_var", "hidden.0.norm.num_batches_tracked",
        "head.weight", "head.bias",
    ]
    cnn = build_model(ModelSpec(kind="cnn", depth=1, channels=4), (1, 8, 8), 3)
    assert list(cnn.state_dict()) == [
        "features.0.conv.weight", "features.0.conv.bias", "dense.weight", "dense.bias", "head.weight", "head.bias",
    ]


def test_an_image_is_read_row_by_row() -> None:
    x = torch.randn(2, 3, 4, 5)  # channels 3, height 4, width 5
    rows = as_sequence(x)
    assert rows.shape == (2, 4, 15)
    assert torch.equal(rows[:, 1], x[:, :, 1, :].reshape(2, 15))  # step 1: every channel's row 1
    assert as_sequence(torch.randn(2, 20)).shape == (2, 20, 1)  # flat: one feature per step


def test_patches_are_unfold_patches_in_row_major_order() -> None:
    x = torch.randn(2, 3, 8, 12)
    expected = F.unfold(x, kernel_size=4, stride=4).transpose(1, 2)  # (batch, 2 * 3 patches, 3 * 4 * 4)
    assert torch.equal(as_patches(x, 4), expected)


@pytest.mark.parametrize("kind", SEQUENCE_KINDS)
def test_sequence_models_need_a_layer(kind: str) -> None:
    with pytest.raises(ValueError, match=rf"^model.depth: {kind} needs at least one .* \(got 0\)"):
        build_model(_small(kind, depth=0), (1, 8, 8), 10)


def test_transformer_rejects_heads_that_do_not_divide_the_width() -> None:
    with pytest.raises(ValueError, match=r"^model.heads: must divide model.width .*\(got heads 3, width 16\)"):
        build_model(_small("transformer", heads=3), (1, 8, 8), 10)


@pytest.mark.parametrize("shape, patch_size, rule", [
    ((1, 28, 28), 5, r"must divide the image's height and width 28x28 \(got 5\)"),
    ((1, 8, 12), 8, r"must divide the image's height and width 8x12 \(got 8\)"),
    ((20,), 4, r"patches need an image input shape .*\(got \(20,\)\)"),
])
def test_transformer_rejects_a_patch_size_the_input_cannot_take(
    shape: tuple[int, ...], patch_size: int, rule: str
) -> None:
    with pytest.raises(ValueError, match="^model.patch_size: " + rule):
        build_model(_small("transformer", patch_size=patch_size), shape, 10)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_transformer_pools_the_class_token_or_the_mean(pooling: str) -> None:
    model = build_model(_small("transformer", pooling=pooling, patch_size=4), (1, 8, 8), 10).eval()
    seen: list[torch.Tensor] = []
    model.norm.register_forward_hook(lambda module, args, out: seen.append(out))  # the encoder's last step
    logits = model(torch.randn(3, 1, 8, 8))
    (encoded,) = seen
    if pooling == "cls":
        assert encoded.shape == (3, 1 + 4, 16)  # the class token in front of 4 patches
        assert torch.allclose(logits, model.head(encoded[:, 0]))
    else:
        assert encoded.shape == (3, 4, 16) and model.tokens.cls is None
        assert torch.allclose(logits, model.head(encoded.mean(dim=1)))


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


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("kind, n_gates", [("lstm", 4), ("gru", 3)])
def test_recurrent_parameter_count(kind: str, n_gates: int, bidirectional: bool) -> None:
    n_features, hidden, n_classes = 28, 16, 10  # MNIST rows
    d = 2 if bidirectional else 1  # directions
    model = build_model(ModelSpec(kind=kind, depth=2, width=hidden, bidirectional=bidirectional), (1, 28, 28),
                        n_classes)
    # Per gate and direction: W_ih, W_hh, and two biases (torch keeps b_ih and b_hh apart).
    layer1 = d * n_gates * (hidden * n_features + hidden * hidden + 2 * hidden)
    layer2 = d * n_gates * (hidden * d * hidden + hidden * hidden + 2 * hidden)  # reads both directions
    head = d * hidden * n_classes + n_classes
    assert count_parameters(model) == layer1 + layer2 + head
    if kind == "lstm" and not bidirectional:
        assert count_parameters(model) == 2944 + 2176 + 170


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_bidirectional_doubles_the_recurrent_weights_and_the_heads_input(kind: str) -> None:
    one_way = build_model(ModelSpec(kind=kind, depth=1, width=16), (1, 8, 8), 10)
    both_ways = build_model(ModelSpec(kind=kind, depth=1, width=16, bidirectional=True), (1, 8, 8), 10)
    assert count_parameters(both_ways.rnn) == 2 * count_parameters(one_way.rnn)
    assert (one_way.head.in_features, both_ways.head.in_features) == (16, 32)


def test_bidirectional_head_sees_each_directions_final_state() -> None:
    model = build_model(ModelSpec(kind="gru", depth=2, width=8, bidirectional=True, dropout=0.0), (6, 3), 4)
    x = torch.randn(5, 6, 3)
    out, _ = model.rnn(x)
    # Forward: after the last step; backward: after the first step (it reads last to first).
    final = torch.cat([out[:, -1, :8], out[:, 0, 8:]], dim=1)
    assert torch.allclose(model(x), model.head(final), atol=1e-6)


@pytest.mark.parametrize("norm, layer", [("layer", nn.LayerNorm), ("batch", nn.BatchNorm1d)])
def test_recurrent_norm_before_the_head(norm: str, layer: type) -> None:
    plain = build_model(ModelSpec(kind="lstm", depth=1, width=16, bidirectional=True), (1, 8, 8), 10)
    normed = build_model(ModelSpec(kind="lstm", depth=1, width=16, bidirectional=True, norm=norm), (1, 8, 8), 10)
    assert isinstance(normed.norm, layer)
    assert count_parameters(normed) == count_parameters(plain) + 2 * 32  # weight and bias over 2 * 16 features


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("shape, patch_size, n_tokens, n_features", [
    ((1, 28, 28), 0, 28, 28),  # rows
    ((1, 28, 28), 7, 16, 49),
    ((1, 28, 28), 4, 49, 16),
    ((20,), 0, 20, 1),
])
def test_transformer_parameter_count(
    shape: tuple[int, ...], patch_size: int, n_tokens: int, n_features: int, pooling: str
) -> None:
    d, depth, n_classes = 16, 2, 10
    spec = ModelSpec(kind="transformer", depth=depth, width=d, heads=4, patch_size=patch_size, pooling=pooling)
    model = build_model(spec, shape, n_classes)
    cls = pooling == "cls"
    embedding = (n_features * d + d) + (n_tokens + cls) * d + cls * d  # proj, positions, class token
    per_layer = (
        (3 * d * d + 3 * d)  # q, k, v projections
        + (d * d + d)  # attention output projection
        + (d * 4 * d + 4 * d) + (4 * d * d + d)  # feed-forward, 4 * d_model wide
        + 2 * 2 * d  # two LayerNorms
    )
    final_norm = 2 * d
    head = d * n_classes + n_classes
    assert count_parameters(model) == embedding + depth * per_layer + final_norm + head


def test_class_token_pooling_costs_the_token_and_its_position() -> None:
    d = 16
    cls = build_model(ModelSpec(kind="transformer", width=d, heads=4, pooling="cls"), (1, 8, 8), 10)
    mean = build_model(ModelSpec(kind="transformer", width=d, heads=4, pooling="mean"), (1, 8, 8), 10)
    assert count_parameters(cls) - count_parameters(mean) == 2 * d


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


def _big_lstm(init: str, **fields: object) -> nn.LSTM:
    # 5 steps of 500 features, hidden 500: each gate's 500 x 500 blocks hold 250k weights.
    spec = ModelSpec(**{"kind": "lstm", "depth": 1, "width": 500, "init": init, **fields})
    return build_model(spec, (5, 500), 10).rnn


@pytest.mark.parametrize("init", ["kaiming_normal", "xavier_uniform", "orthogonal"])
def test_lstm_forget_gate_bias_is_one_and_the_other_biases_zero(init: str) -> None:
    rnn = build_model(ModelSpec(kind="lstm", depth=2, width=8, bidirectional=True, init=init), (1, 8, 8), 10).rnn
    for suffix in ("l0", "l0_reverse", "l1", "l1_reverse"):
        bias = getattr(rnn, f"bias_ih_{suffix}") + getattr(rnn, f"bias_hh_{suffix}")  # torch adds both
        input_gate, forget_gate, cell_gate, output_gate = bias.chunk(4)
        assert forget_gate.eq(1).all()
        assert input_gate.eq(0).all() and cell_gate.eq(0).all() and output_gate.eq(0).all()


def test_gru_biases_are_zero() -> None:
    rnn = build_model(ModelSpec(kind="gru", depth=2, width=8, init="orthogonal"), (1, 8, 8), 10).rnn
    assert all(p.eq(0).all() for name, p in rnn.named_parameters() if name.startswith("bias"))


@pytest.mark.parametrize("kind, n_gates", [("lstm", 4), ("gru", 3)])
def test_orthogonal_makes_every_gates_hidden_to_hidden_matrix_orthogonal(kind: str, n_gates: int) -> None:
    rnn = build_model(ModelSpec(kind=kind, depth=2, width=32, init="orthogonal"), (1, 28, 28), 10).rnn
    eye = torch.eye(32)
    for name in ("weight_hh_l0", "weight_hh_l1"):
        gates = getattr(rnn, name).chunk(n_gates)
        assert len(gates) == n_gates
        for w in gates:  # gain 1: the gates squash with sigmoid and tanh
            assert torch.allclose(w @ w.T, eye, atol=1e-5) and torch.allclose(w.T @ w, eye, atol=1e-5)


def test_kaiming_draws_each_lstm_gate_with_the_linear_gain() -> None:
    rnn = _big_lstm("kaiming_normal", activation="relu")  # the activation does not reach the gates
    for w in (*rnn.weight_ih_l0.chunk(4), *rnn.weight_hh_l0.chunk(4)):
        assert w.std().item() == pytest.approx(1 / math.sqrt(500), rel=0.02)


def test_xavier_uses_each_gates_own_fans() -> None:
    rnn = _big_lstm("xavier_uniform")
    bound = math.sqrt(6 / (500 + 500))  # a gate maps 500 -> 500; the stacked matrix is 2000 x 500
    for w in rnn.weight_hh_l0.chunk(4):
        assert w.abs().max().item() <= bound
        assert w.abs().max().item() == pytest.approx(bound, rel=0.01)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_default_init_keeps_torchs_recurrent_init(kind: str) -> None:
    model = build_model(ModelSpec(kind=kind, depth=1, width=16, init="default"), (1, 8, 8), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init_weights(model, "default", "relu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # torch draws every recurrent weight and bias from U(-1/sqrt(hidden), 1/sqrt(hidden)).
    bias = model.rnn.bias_ih_l0
    assert bias.ne(0).all() and bias.abs().max().item() <= 1 / math.sqrt(16)
    if kind == "lstm":
        assert not bias.chunk(4)[1].eq(1).any()


def _big_transformer(init: str) -> nn.Module:
    spec = ModelSpec(kind="transformer", depth=1, width=256, heads=4, patch_size=2, init=init, activation="gelu")
    return build_model(spec, (1, 8, 8), 10)  # 16 patches + the class token


def test_transformer_kaiming_gains_follow_what_each_layer_feeds() -> None:
    model = _big_transformer("kaiming_normal")
    layer = model.encoder[0]
    d = 256
    for block in layer.self_attn.in_proj_weight.chunk(3):  # q, k, v: linear gain, fan_in d each
        assert block.std().item() == pytest.approx(1 / math.sqrt(d), rel=0.02)
    assert layer.self_attn.in_proj_bias.eq(0).all()
    assert layer.self_attn.out_proj.weight.std().item() == pytest.approx(1 / math.sqrt(d), rel=0.02)
    assert layer.linear1.weight.std().item() == pytest.approx(math.sqrt(2 / d), rel=0.02)  # into gelu
    assert layer.linear2.weight.std().item() == pytest.approx(1 / math.sqrt(4 * d), rel=0.02)  # residual
    assert model.head.weight.std().item() == pytest.approx(1 / math.sqrt(d), rel=0.05)
    assert all(linear.bias.eq(0).all() for linear in _linears(model))


@pytest.mark.parametrize("init", ["orthogonal", "default"])
def test_positions_and_class_token_are_small_truncated_normals(init: str) -> None:
    model = _big_transformer(init)
    # A normal truncated at 2 std keeps 0.880 of its std.
    truncated_std = TOKEN_STD * 0.8796
    for param in (model.tokens.position, model.tokens.cls):
        assert param.abs().max().item() <= 2 * TOKEN_STD
    assert model.tokens.position.std().item() == pytest.approx(truncated_std, rel=0.05)


def test_transformer_orthogonal_attention_blocks_are_orthogonal() -> None:
    model = _big_transformer("orthogonal")
    eye = torch.eye(256)
    for w in model.encoder[0].self_attn.in_proj_weight.chunk(3):
        assert torch.allclose(w @ w.T, eye, atol=1e-4)


def test_transformer_default_init_keeps_torchs_init() -> None:
    model = _big_transformer("default")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init_weights(model, "default", "gelu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # torch's own: xavier_uniform over the stacked (3d, d) in_proj_weight, zero in_proj_bias.
    bound = math.sqrt(6 / (3 * 256 + 256))
    attention = model.encoder[0].self_attn
    assert attention.in_proj_weight.abs().max().item() == pytest.approx(bound, rel=0.01)
    assert model.head.bias.ne(0).any()


def test_transformer_layers_start_different_under_default_init() -> None:
    # nn.TransformerEncoder would deep-copy one layer: every layer the same weights.
    model = build_model(_small("transformer", depth=2, init="default"), (1, 8, 8), 10)
    first, second = (layer.self_attn.in_proj_weight for layer in model.encoder)
    assert not torch.equal(first, second)


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


# ---------------------------------------------------------------- training on MNIST


@pytest.fixture
def one_thread() -> Iterator[None]:
    # Sequence models run many small ops; on a shared two-core machine two intra-op threads
    # wait on each other at every one of them, and one thread is both faster and steadier.
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="MNIST is read from ../shared/data")
@pytest.mark.parametrize("model", [
    {"kind": "lstm", "width": 64},
    {"kind": "gru", "width": 64},
    {"kind": "transformer", "width": 32, "heads": 4, "depth": 2, "init": "orthogonal"},
    {"kind": "cnn", "depth": 2, "channels": 8, "width": 32, "norm": "batch"},
], ids=lambda m: m["kind"])
def test_every_family_learns_mnist_in_two_epochs(model: dict, one_thread: None) -> None:
    # 1,800 training images, 2 epochs of batches of 16: chance is 10%, every family reaches
    # 75-93% (a few seconds each on one core).
    raw = {
        "name": "test-models-mnist",
        "seed": 0,
        "data": {"dataset": "mnist", "root": str(SHARED_DATA / "mnist"), "download": False, "subset": 2000},
        "model": {"depth": 1, "dropout": 0.0, **model},
        "train": {"epochs": 2, "batch_size": 16, "lr": 5.0e-3, "schedule": "constant", "device": "cpu"},
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "search": {},
    }
    cfg = trial_config(spec_from_dict(raw), {})
    result = train_trial(cfg, load_data(cfg.data, cfg.data_seed))
    assert result.state == "COMPLETE" and result.epochs_run == 2
    assert result.test_accuracy >= 0.6
