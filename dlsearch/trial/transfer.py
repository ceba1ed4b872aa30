"""Transfer learning: start a model from trained weights, and keep chosen layers fixed.

Contract: `load_weights(model, path)` copies a checkpoint's tensors into `model`
by parameter name and draws the head anew when its shape differs (another
number of classes); `freeze(model, what)` turns off gradients for the named
layers or the whole backbone. What a `model.init_from` reference may be is
`dlsearch.config.sources`; fetching one from MLflow is
`dlsearch.tracking.tracker.fetch_checkpoint`; this module imports only torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from dlsearch.config.sources import SourceError

HEAD = "head"  # every built-in model names its classifier `head`; the rest is the backbone


def read_state(path: str | Path) -> dict[str, Any]:
    """The model weights in a checkpoint file: a state_dict, or a dlsearch checkpoint holding one.

    Loaded with `weights_only=True`: a checkpoint from elsewhere cannot run code when read.
    """
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise SourceError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from err
    if isinstance(obj, Mapping):
        for key in ("best_state", "model", "state_dict"):  # a resume checkpoint keeps the best weights too
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(hasattr(v, "shape") for v in obj.values()):
        raise SourceError(f"{path} holds no model weights (a state_dict of tensors)")
    return dict(obj)


def load_weights(model: Any, state: Mapping[str, Any], head: str = HEAD) -> list[str]:
    """Copy `state` into `model`; returns the names of parameters left as initialised (the new head).

    Tensors are matched by name. The head's tensors are skipped when their shape differs
    (a task with another number of classes gets a new head); any other missing or
    misshapen tensor means the source is another architecture, and raises SourceError.
    """
    own = model.state_dict()
    fresh = [k for k in own if k.startswith(head + ".") and k in state and state[k].shape != own[k].shape]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state and k not in fresh and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        parts = [f"shapes differ: {', '.join(mismatched[:4])}"] if mismatched else []
        parts += [f"missing: {', '.join(missing[:4])}"] if missing else []
        parts += [f"not in the model: {', '.join(unexpected[:4])}"] if unexpected else []
        raise SourceError("the source is another architecture (" + "; ".join(parts) + "); the model section must "
                          "build the source's layers (same kind, depth, width)")
    model.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
    return fresh


def freeze(model: Any, what: str | list[str], head: str = HEAD) -> list[str]:
    """Turn off gradients for `what` ("backbone", "none" or layer-name prefixes); returns the frozen names."""
    if what == "none":
        return []
    names = [n for n, _ in model.named_parameters()]
    if what == "backbone":
        prefixes = [n for n in names if not n.startswith(head + ".")]
        if len(prefixes) == len(names):
            raise SourceError(f"model.freeze: backbone means everything but the layer named {head!r}, "
                              "and this model has none; name the layers to freeze instead")
    else:
        prefixes = list(what)
        unknown = [p for p in prefixes if not any(n == p or n.startswith(p + ".") for n in names)]
        if unknown:
            layers = sorted({n.rsplit(".", 1)[0] for n in names})
            raise SourceError(f"model.freeze: no layer named {', '.join(unknown)} (layers: {', '.join(layers)})")
    frozen = []
    for name, param in model.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def set_train_mode(model: Any) -> None:
    """`model.train()`, except modules whose parameters are all frozen, which stay in eval mode.

    A frozen BatchNorm would otherwise keep updating its running statistics. Dropout has no
    parameters and follows `model.train()`.
    """
    model.train()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            module.eval()


