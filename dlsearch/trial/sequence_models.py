"""The sequence models: LSTM and GRU classifiers, and a small pre-norm transformer encoder.

They read a sample as a sequence of feature vectors (`sequence_shape`): an image
`(C, H, W)` as H steps of its rows (C*W features each), a flat sample `(F,)` as F
steps of one feature, a `(T, F)` sample as T steps of F features. The transformer
can take non-overlapping p x p patches of an image as its tokens instead.
Every model ends in an `nn.Linear` child named `head`, its last weighted layer, so
transfer learning can freeze the rest (the backbone) and replace the head.

`dlsearch.trial.models.build_model` calls the builders here and then initialises the
weights (`dlsearch.trial.models.init_weights` knows these layers). Like that module,
this one imports only torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:  # the spec module pulls in pydantic and yaml; models need only its fields
    from dlsearch.config.spec import ModelSpec

# The std of learned positional embeddings and of the class token (BERT, ViT); small, so that
# at the start the tokens' content outweighs their position.
TOKEN_STD = 0.02
FEEDFORWARD_RATIO = 4  # the transformer's hidden feed-forward width per unit of d_model (Vaswani et al.)


def recurrent(spec: ModelSpec, input_shape: tuple[int, ...], n_classes: int) -> RecurrentClassifier:
    """`kind: lstm | gru`: the recurrent stack, then its final state -> norm -> Dropout -> head.

    `depth` layers of hidden size `width`, with `dropout` between layers and before
    the head. The final state is the last layer's state after the last step, and with
    `bidirectional` also the backward direction's after the first step, concatenated
    (2 * width features). `norm: layer | batch` puts a LayerNorm / BatchNorm1d on
    them before the head: the recurrence keeps its own scale in check with saturating
    gates, so only the head's input is normalised. `activation` does not apply (the
    gates' sigmoid and tanh are part of the cell).
    """
    if spec.depth < 1:
        raise ValueError(f"model.depth: {spec.kind} needs at least one recurrent layer (got {spec.depth})")
    _, n_features = sequence_shape(input_shape, spec.kind)
    return RecurrentClassifier(
        cell=spec.kind, n_features=n_features, hidden_size=spec.width, n_layers=spec.depth,
        dropout=spec.dropout, bidirectional=spec.bidirectional, norm=spec.norm, n_classes=n_classes,
    )


def transformer(spec: ModelSpec, input_shape: tuple[int, ...], n_classes: int) -> TransformerClassifier:
    """`kind: transformer`: a pre-norm encoder over rows or patches, pooled into the head.

    Tokens (image rows, or p x p patches for `patch_size: p`) -> Linear to `width`
    (d_model) -> learned positions, a class token in front for `pooling: cls` ->
    Dropout -> `depth` encoder layers (`heads` heads, feed-forward 4 * width, norm
    first) -> LayerNorm -> the class token's output or the mean over the tokens ->
    head. The feed-forward uses `activation` when it is relu or gelu, else gelu
    (transformers' usual one; torch's encoder layer names only these two). `norm`
    does not apply: the LayerNorms are part of the architecture.
    """
    if spec.depth < 1:
        raise ValueError(f"model.depth: transformer needs at least one encoder layer (got {spec.depth})")
    if spec.width % spec.heads:
        raise ValueError(f"model.heads: must divide model.width (the d_model) (got heads {spec.heads}, "
                         f"width {spec.width})")
    if spec.patch_size:
        n_tokens, n_features = patch_shape(input_shape, spec.patch_size)
    else:
        n_tokens, n_features = sequence_shape(input_shape, spec.kind)
    return TransformerClassifier(
        n_tokens=n_tokens, n_features=n_features, patch_size=spec.patch_size, d_model=spec.width,
        n_heads=spec.heads, n_layers=spec.depth, dropout=spec.dropout,
        activation=spec.activation if spec.activation in ("relu", "gelu") else "gelu",
        class_token=spec.pooling == "cls", n_classes=n_classes,
    )


def sequence_shape(input_shape: tuple[int, ...], kind: str) -> tuple[int, int]:
    """(steps, features per step) that `as_sequence` makes of a sample of `input_shape`."""
    if len(input_shape) == 1:
        return input_shape[0], 1
    if len(input_shape) == 2:
        return input_shape[0], input_shape[1]
    if len(input_shape) == 3:
        channels, height, width = input_shape
        return height, channels * width
    raise ValueError(f"model.kind: {kind} reads samples of shape (features,), (steps, features) or "
                     f"(channels, height, width) (got {input_shape})")


def patch_shape(input_shape: tuple[int, ...], patch_size: int) -> tuple[int, int]:
    """(tokens, features per token) that `as_patches` makes of an image of `input_shape`."""
    if len(input_shape) != 3:
        raise ValueError(f"model.patch_size: patches need an image input shape (channels, height, width) "
                         f"(got {input_shape}); use patch_size: 0 to read the sample as a sequence")
    channels, height, width = input_shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"model.patch_size: must divide the image's height and width {height}x{width} "
                         f"(got {patch_size})")
    return (height // patch_size) * (width // patch_size), channels * patch_size * patch_size


def as_sequence(x: torch.Tensor) -> torch.Tensor:
    """A batch as (batch, steps, features): (B, F) -> (B, F, 1); (B, C, H, W) -> (B, H, C*W)."""
    if x.dim() == 2:
        return x.unsqueeze(-1)
    if x.dim() == 4:
        return x.permute(0, 2, 1, 3).flatten(2)  # row h holds every channel's pixels of that row
    return x


def as_patches(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, tokens, C*p*p): patches row by row, each as (channel, row, column).

    The same layout as `F.unfold(x, p, stride=p).transpose(1, 2)`.
    """
    b, c, h, w = x.shape
    p = patch_size
    patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // p) * (w // p), c * p * p)


class RecurrentClassifier(nn.Module):
    """An nn.LSTM or nn.GRU (batch first) whose final state feeds norm -> Dropout -> `head`."""

    def __init__(self, *, cell: str, n_features: int, hidden_size: int, n_layers: int, dropout: float,
                 bidirectional: bool, norm: str, n_classes: int) -> None:
        super().__init__()
        rnn_class = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        # torch applies `dropout` between stacked layers only (and warns when there is one
        # layer); the Dropout before the head covers the last layer's output.
        self.rnn = rnn_class(n_features, hidden_size, num_layers=n_layers, dropout=dropout if n_layers > 1 else 0.0,
                             batch_first=True, bidirectional=bidirectional)
        n_out = hidden_size * (2 if bidirectional else 1)
        if norm == "none":
            self.norm: nn.Module = nn.Identity()  # no parameters, no state_dict keys
        else:
            self.norm = nn.LayerNorm(n_out) if norm == "layer" else nn.BatchNorm1d(n_out)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(n_out, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, state = self.rnn(as_sequence(x))
        h_n = state[0] if isinstance(state, tuple) else state  # an LSTM's state is (h_n, c_n)
        # h_n is (layers * directions, batch, hidden), the last layer last. Its backward
        # direction ends at the first step: the output at the last step (out[:, -1]) would
        # give that direction after reading one row only.
        n_directions = 2 if self.rnn.bidirectional else 1
        final = h_n[-n_directions:].transpose(0, 1).flatten(1)  # (batch, [forward, backward] * hidden)
        return self.head(self.dropout(self.norm(final)))


class TokenEmbedding(nn.Module):
    """Tokens -> Linear to d_model (`proj`), a learned class token in front, plus learned positions."""

    def __init__(self, n_features: int, d_model: int, n_tokens: int, class_token: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(n_features, d_model)
        if class_token:
            self.cls = nn.Parameter(torch.empty(1, 1, d_model))
        else:
            self.register_parameter("cls", None)
        self.position = nn.Parameter(torch.empty(1, n_tokens + int(class_token), d_model))
        self.draw_tokens()

    def draw_tokens(self) -> None:
        """Positions and class token from a normal with std TOKEN_STD, truncated at 2 std (ViT)."""
        for param in (self.position, self.cls):
            if param is not None:
                nn.init.trunc_normal_(param, std=TOKEN_STD, a=-2 * TOKEN_STD, b=2 * TOKEN_STD)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.proj(tokens)
        if self.cls is not None:
            h = torch.cat([self.cls.expand(len(h), -1, -1), h], dim=1)
        return h + self.position


class TransformerClassifier(nn.Module):
    """Pre-norm transformer encoder over a sample's tokens; class token or mean pooling into `head`."""

    def __init__(self, *, n_tokens: int, n_features: int, patch_size: int, d_model: int, n_heads: int,
                 n_layers: int, dropout: float, activation: str, class_token: bool, n_classes: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.tokens = TokenEmbedding(n_features, d_model, n_tokens, class_token)
        self.dropout = nn.Dropout(dropout)
        # Layers built one by one: nn.TransformerEncoder deep-copies a single layer, so under
        # `init: default` every layer would start with the same weights. Built this way there is
        # no nested-tensor fast path either (it does not take norm_first layers, and warns).
        self.encoder = nn.Sequential(*(
            nn.TransformerEncoderLayer(
                d_model, n_heads, dim_feedforward=FEEDFORWARD_RATIO * d_model, dropout=dropout,
                activation=activation, batch_first=True, norm_first=True,
            )
            for _ in range(n_layers)
        ))
        self.norm = nn.LayerNorm(d_model)  # pre-norm leaves the residual stream unnormalised
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = as_patches(x, self.patch_size) if self.patch_size else as_sequence(x)
        h = self.norm(self.encoder(self.dropout(self.tokens(tokens))))
        pooled = h[:, 0] if self.tokens.cls is not None else h.mean(dim=1)
        return self.head(pooled)
