"""Where a study's stores are: URLs as the study file gives them, resolved the same way everywhere."""

from __future__ import annotations

from pathlib import Path


def tracking_uri(uri: str) -> str:
    """The tracking URI with a relative SQLite or file path made absolute (against the cwd)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


def is_server(uri: str) -> bool:
    """A tracking server (rather than a database or folder the driver opens itself)."""
    return uri.startswith(("http://", "https://"))
