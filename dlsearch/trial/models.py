"""The built-in models, built from the `model:` section, and their weight initialisation.

Contract: `build_model(spec, input_shape, n_classes)` returns an `nn.Module`
that maps a batch of shape `(batch, *input_shape)` to `(batch, n_classes)`
outputs (logits; `n_classes=1` gives the single logit of a binary task), with
its weights initialised by `init_weights`. `input_shape` is per sample:
`(1, 28, 28)` for MNIST, `(1, 8, 8)` for sklearn digits, `(20,)` for tabular
features. Kinds: `mlp` and `cnn` (here), `lstm`, `gru` and `transformer`
(`dlsearch.trial.sequence_models`). Every built-in model ends in an `nn.Linear` child
named `head`, its last weighted layer: transfer learning freezes the rest (the
backbone) and replaces the head when the number of classes differs.
`kind: custom` calls the user's `model.factory(model_section, input_shape,
n_classes)` instead (a plain dict, its own keys included) and applies
`model.init` to what it returns (custom models default to `init: default`,
which keeps the factory's own init).

This module imports only torch, so a trial can build its model in a plain
shell with no tuner or tracker around.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from dlsearch.trial.sequence_models import TokenEmbedding, recurrent, transformer

if TYPE_CHECKING:  # the spec module pulls in pydantic and yaml; models need only its fields
    from dlsearch.config.spec import ModelSpec

KINDS = ("mlp", "cnn", "lstm", "gru", "transformer", "custom")
ACTIVATIONS = ("relu", "leaky_relu", "gelu", "tanh", "sigmoid")
INITS = ("kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform", "orthogonal", "default")
LEAKY_RELU_SLOPE = 0.01  # PyTorch's default, and the slope the kaiming gain is computed for

# The layers whose weights an init scheme draws, and the norm layers it resets.
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
_LINEAR = ("linear", 0.0)  # the (nonlinearity, slope) of a layer whose output no activation follows


def build_model(
    spec: ModelSpec, input_shape: tuple[int, ...], n_classes: int, *, base_dir: str | None = None
) -> nn.Module:
    """Build the model `spec` describes and initialise it with `spec.init`.

    `mlp`: flatten, then `depth` blocks of Linear(width) -> norm -> activation
    -> Dropout, then Linear(n_classes); depth 0 is a linear classifier.
    `cnn`: `depth` blocks of Conv2d -> norm -> activation -> MaxPool2d(2), the
    channels doubling per block from `channels`, then Flatten -> Dropout ->
    Linear(width) -> activation -> Dropout -> Linear(n_classes). It needs a
    `(channels, height, width)` input shape.
    `lstm` / `gru`: the sample read as a sequence (an image row by row, a flat
    sample one feature per step), `depth` >= 1 recurrent layers of hidden size
    `width`, optionally `bidirectional`; the final state -> norm -> Dropout ->
    Linear(n_classes). See `dlsearch.trial.sequence_models.recurrent`.
    `transformer`: rows or `patch_size` x `patch_size` patches as tokens, a
    pre-norm encoder of `depth` >= 1 layers, d_model `width` and `heads` heads,
    pooled by a class token or the mean (`pooling`), then Linear(n_classes). See
    `dlsearch.trial.sequence_models.transformer`.
    `custom`: the module `model.factory` returns, its entry point looked for in
    `base_dir` (the study's folder), then the working directory.
    In every built-in kind the last layer is the `nn.Linear` child `head`.

    Raises ValueError for a bad shape or class count, or a setting the kind
    cannot take (the message names its `model.` key), TypeError when a custom
    factory returns something else than an `nn.Module`.
    """
    input_shape = tuple(int(d) for d in input_shape)  # accepts torch.Size and numpy ints
    if not input_shape or min(input_shape) < 1:
        raise ValueError(f"input_shape: every dimension must be a positive int (got {input_shape})")
    if n_classes < 1:
        raise ValueError(f"n_classes: must be >= 1 (got {n_classes})")
    if spec.activation not in ACTIVATIONS:
        raise ValueError(f"model.activation: must be one of {', '.join(ACTIVATIONS)} (got {spec.activation!r})")
    if spec.kind == "mlp":
        model = _mlp(spec, input_shape, n_classes)
    elif spec.kind == "cnn":
        model = _cnn(spec, input_shape, n_classes)
    elif spec.kind in ("lstm", "gru"):
        model = recurrent(spec, input_shape, n_classes)
    elif spec.kind == "transformer":
        model = transformer(spec, input_shape, n_classes)
    elif spec.kind == "custom":
        model = _custom(spec, input_shape, n_classes, base_dir)
    else:
        raise ValueError(f"model.kind: must be one of {', '.join(KINDS)} (got {spec.kind!r})")
    init_weights(model, spec.init, spec.activation)
    return model


def init_weights(model: nn.Module, init: str, activation: str) -> None:
    """Initialise `model` in place with the scheme `init`, scaled for `activation`.

    Every Linear and Conv weight is drawn by the scheme with the gain of the
    nonlinearity its output goes through: `activation` by default (gelu counts
    as relu, leaky_relu has slope 0.01; kaiming uses mode fan_in), 1.0 (linear)
    where none follows. The last Linear/Conv layer in module order is taken to
    be the classifier head and gets the linear gain. Biases become 0; norm
    layers get weight 1 and bias 0. The layers of the sequence models:

    - nn.LSTM / nn.GRU / nn.RNN: each gate's block of `weight_ih_*` and
      `weight_hh_*` is drawn as its own map, so `orthogonal` makes every gate's
      hidden-to-hidden matrix orthogonal. Gain 1 for LSTM and GRU, whose gates
      squash with sigmoid and tanh (a larger gain saturates them), the tanh or
      relu gain for nn.RNN. Biases 0, except the LSTM forget gate's: 1.
    - nn.MultiheadAttention: the q, k and v blocks of `in_proj_weight` and
      `out_proj` with the linear gain, biases 0.
    - nn.TransformerEncoderLayer: `linear1` with the gain of the layer's own
      relu or gelu, `linear2` linear (it feeds the residual sum).
    - TokenEmbedding: `proj` linear; positions and class token from a normal of
      std 0.02 truncated at 2 std, whatever the scheme.

    `init="default"` leaves PyTorch's own initialisation untouched, biases too.
    """
    if init not in INITS:
        raise ValueError(f"model.init: must be one of {', '.join(INITS)} (got {init!r})")
    if activation not in ACTIVATIONS:
        raise ValueError(f"model.activation: must be one of {', '.join(ACTIVATIONS)} (got {activation!r})")
    if init == "default":
        return
    weighted = [m for m in model.modules() if isinstance(m, _WEIGHTED)]
    # The (nonlinearity, slope) each weighted layer's output goes through: what its gain is for.
    feeds = {layer: _torch_nonlinearity(activation) for layer in weighted}
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            _init_recurrent(module, init)
        elif isinstance(module, nn.MultiheadAttention):
            _init_attention(module, init)
            feeds[module.out_proj] = _LINEAR  # into the residual sum
        elif isinstance(module, nn.TransformerEncoderLayer):
            if module.activation_relu_or_gelu:  # 0 for a callable of the user's: keep `activation`
                feeds[module.linear1] = ("relu", 0.0)
            feeds[module.linear2] = _LINEAR  # into the residual sum
        elif isinstance(module, TokenEmbedding):
            feeds[module.proj] = _LINEAR  # into the sum with the positions
            module.draw_tokens()
    if weighted:
        feeds[weighted[-1]] = _LINEAR  # the head: no nonlinearity follows it
    for layer in weighted:
        _draw(layer.weight, init, *feeds[layer])
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    for norm in (m for m in model.modules() if isinstance(m, _NORMS)):
        if norm.weight is not None:  # None when built with affine=False
            nn.init.ones_(norm.weight)
        if norm.bias is not None:
            nn.init.zeros_(norm.bias)


def count_parameters(model: nn.Module) -> int:
    """The number of scalars in `model`'s parameters, trainable or not.

    Buffers such as BatchNorm running statistics are not parameters and are not
    counted; a parameter shared by two layers is counted once.
    """
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- builders


def _mlp(spec: ModelSpec, input_shape: tuple[int, ...], n_classes: int) -> nn.Sequential:
    # Named children give readable state_dict keys: hidden.0.linear.weight, head.bias.
    n_in = math.prod(input_shape)
    blocks = []
    for _ in range(spec.depth):
        block = OrderedDict(linear=nn.Linear(n_in, spec.width))
        if spec.norm == "batch":
            block["norm"] = nn.BatchNorm1d(spec.width)
        elif spec.norm == "layer":
            block["norm"] = nn.LayerNorm(spec.width)
        block["act"] = _activation(spec.activation)
        # Kept at p=0 too, so the module layout does not depend on a searched value.
        block["dropout"] = nn.Dropout(spec.dropout)
        blocks.append(nn.Sequential(block))
        n_in = spec.width
    return nn.Sequential(OrderedDict(
        flatten=nn.Flatten(),
        hidden=nn.Sequential(*blocks),
        head=nn.Linear(n_in, n_classes),
    ))


def _cnn(spec: ModelSpec, input_shape: tuple[int, ...], n_classes: int) -> nn.Sequential:
    if len(input_shape) != 3:
        raise ValueError(
            f"model.kind: cnn needs an image input shape (channels, height, width) (got {input_shape}); "
            "use kind: mlp for flat features"
        )
    c_in, height, width = input_shape
    padding = spec.kernel_size // 2  # keeps height and width for the odd kernels the spec allows
    blocks = []
    for i in range(spec.depth):
        c_out = spec.channels * 2**i
        block = OrderedDict(conv=nn.Conv2d(c_in, c_out, spec.kernel_size, padding=padding))
        if spec.norm == "batch":
            block["norm"] = nn.BatchNorm2d(c_out)
        elif spec.norm == "layer":
            # One group normalises each sample over (C, H, W): layer norm for
            # feature maps, without fixing H and W into the module.
            block["norm"] = nn.GroupNorm(1, c_out)
        block["act"] = _activation(spec.activation)
        height = height + 2 * padding - spec.kernel_size + 1
        width = width + 2 * padding - spec.kernel_size + 1
        # Pool only while there is something to halve, so an 8x8 digit or a
        # deep stack ends at 1x1 instead of an empty map.
        if min(height, width) >= 2:
            block["pool"] = nn.MaxPool2d(2)
            height, width = height // 2, width // 2
        blocks.append(nn.Sequential(block))
        c_in = c_out
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(*blocks),
        flatten=nn.Flatten(),
        dropout=nn.Dropout(spec.dropout),
        dense=nn.Linear(c_in * height * width, spec.width),
        act=_activation(spec.activation),
        dense_dropout=nn.Dropout(spec.dropout),
        head=nn.Linear(spec.width, n_classes),
    ))


def _custom(spec: ModelSpec, input_shape: tuple[int, ...], n_classes: int, base_dir: str | None) -> nn.Module:
    from dlsearch.config.entrypoints import resolve

    factory = resolve(spec.factory or "", "model.factory", base_dir)
    model = factory(spec.model_dump(), input_shape, n_classes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model.factory: must return a torch.nn.Module (got a {type(model).__name__} from "
                        f"{spec.factory})")
    return model


# ---------------------------------------------------------------- helpers


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(LEAKY_RELU_SLOPE)
    if name == "gelu":
        return nn.GELU()
    if name == "tanh":
        return nn.Tanh()
    if name == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"model.activation: must be one of {', '.join(ACTIVATIONS)} (got {name!r})")


def _torch_nonlinearity(activation: str) -> tuple[str, float]:
    """The (nonlinearity, negative slope) that torch.nn.init computes the gain of `activation` from."""
    if activation == "leaky_relu":
        return "leaky_relu", LEAKY_RELU_SLOPE
    if activation == "gelu":
        return "relu", 0.0  # calculate_gain knows no gelu; it is relu-like for large |x|
    return activation, 0.0


def _init_recurrent(rnn: nn.RNNBase, init: str) -> None:
    n_gates = {"LSTM": 4, "GRU": 3}.get(rnn.mode, 1)  # stacked along dim 0 of weight_ih/hh and the biases
    nonlinearity = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}.get(rnn.mode, "linear")
    for name, param in rnn.named_parameters():
        if name.startswith(("weight_ih", "weight_hh")):
            for gate in param.detach().chunk(n_gates):  # views: drawing them fills the parameter
                _draw(gate, init, nonlinearity, 0.0)
        elif name.startswith("weight_hr"):  # an LSTM's projection (proj_size > 0)
            _draw(param, init, "linear", 0.0)
        else:  # bias_ih_*, bias_hh_*
            nn.init.zeros_(param)
    if rnn.mode == "LSTM":
        # Forget-gate bias 1 (Gers et al. 2000; Jozefowicz et al. 2015): the cell starts out
        # remembering, so its state and gradient carry across steps from the first update.
        # Gates are stacked input, forget, cell, output; bias_ih and bias_hh are summed, so
        # bias_ih alone carries the 1.
        for name, param in rnn.named_parameters():
            if name.startswith("bias_ih"):
                nn.init.ones_(param.detach()[rnn.hidden_size : 2 * rnn.hidden_size])


def _init_attention(attention: nn.MultiheadAttention, init: str) -> None:
    # q, k and v are three d x d maps packed in one bare Parameter (not an nn.Linear, so the
    # Linear pass misses it); each gets its own fans, and the linear gain: no activation follows.
    if attention.in_proj_weight is not None:
        blocks = attention.in_proj_weight.detach().chunk(3)
    else:  # kdim or vdim differ from embed_dim: three separate parameters
        blocks = (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
    for block in blocks:
        _draw(block, init, *_LINEAR)
    if attention.in_proj_bias is not None:
        nn.init.zeros_(attention.in_proj_bias)


def _draw(weight: torch.Tensor, init: str, nonlinearity: str, slope: float) -> None:
    if init == "kaiming_normal":
        nn.init.kaiming_normal_(weight, a=slope, mode="fan_in", nonlinearity=nonlinearity)
    elif init == "kaiming_uniform":
        nn.init.kaiming_uniform_(weight, a=slope, mode="fan_in", nonlinearity=nonlinearity)
    else:
        gain = nn.init.calculate_gain(nonlinearity, slope)
        if init == "xavier_normal":
            nn.init.xavier_normal_(weight, gain=gain)
        elif init == "xavier_uniform":
            nn.init.xavier_uniform_(weight, gain=gain)
        elif init == "orthogonal":
            nn.init.orthogonal_(weight, gain=gain)
        else:
            raise AssertionError(f"unhandled init {init!r}")  # INITS was checked by the caller
