"""Checks made before a run creates anything: stores writable, services reachable, one driver per study.

A problem found here leaves no trace: no experiment, no study in storage, no Ray.
Folders that cannot be written and passwords written into a URI are input
problems (exit 2, `SpecError`); a service that does not answer, or refuses the
credentials the environment gives, is `ServiceUnreachable` (exit 1).

Secrets come from the environment only, because the study file and the resolved
spec are logged with the study: MLflow reads MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN, libpq reads PGPASSWORD (or
~/.pgpass), Ray reads RAY_AUTH_TOKEN or the file named by RAY_AUTH_TOKEN_PATH.
"""

from __future__ import annotations

import fcntl
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dlsearch.config.spec import SpecError, StudySpec
from dlsearch.errors import RunError


class ServiceUnreachable(RunError):
    """A tracking server, database or Ray cluster that does not answer (exit 1)."""


class StudyBusy(RunError):
    """Another `dlsearch run` of the same study holds its lock (exit 1)."""


def check_stores(spec: StudySpec) -> None:
    """Every local store must be writable; every remote one must answer. Writes nothing."""
    problems: list[str] = []
    t = spec.tracking
    for where, uri in (("tracking.uri", t.uri), ("tracking.optuna_storage", t.optuna_storage)):
        path = sqlite_path(uri)
        if path is not None:
            problems += _writable(where, path)
    problems += _writable("tracking.artifacts", Path(t.artifacts) / "x")
    storage = spec.resources.storage_path
    if storage is not None and "://" not in storage:
        problems += _writable("resources.storage_path", Path(storage) / "x")
    for where, uri in (("tracking.uri", t.uri), ("tracking.optuna_storage", t.optuna_storage)):
        if urllib.parse.urlsplit(uri).password:
            variables = ("MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
                         if where == "tracking.uri" else "PGPASSWORD (or ~/.pgpass)")
            problems.append(f"{where}: a password in the URI would be logged with the study; "
                            f"remove it and set {variables} in the environment")
    if problems:
        raise SpecError(problems)
    if t.uri.startswith(("http://", "https://")):
        _check_http("tracking.uri", t.uri.rstrip("/") + "/health")
        _check_credentials("tracking.uri", t.uri)
    for where, uri in (("tracking.optuna_storage", t.optuna_storage),):
        if sqlite_path(uri) is None:
            _check_database(where, uri)


def check_ray_address(address: str | None) -> None:
    """A `host:port` or `ray://host:port` address must accept a connection, and a cluster that uses
    token authentication must accept the token the environment gives (RAY_AUTH_TOKEN[_PATH])."""
    if not address or address in ("auto", "local"):
        return
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except (OSError, ValueError) as err:
        raise ServiceUnreachable(f"resources.address: cannot reach the Ray cluster at {address} ({err})") from None
    token_given = _use_ray_token()
    if "://" not in address:  # a GCS address; Ray Client (ray://) authenticates on its own connection
        _check_ray_token(address, token_given)


@contextmanager
def study_lock(spec: StudySpec) -> Iterator[None]:
    """Hold an exclusive lock on the study while a driver runs it (released when the process dies).

    Holding it, the stores exist: `create_stores` has made any new SQLite database.
    """
    folder = Path(spec.tracking.artifacts).resolve().parent / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec.slug}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StudyBusy(
                f"{spec.name}: another dlsearch run of this study is running (pid {holder}); "
                "wait for it, or stop it and rerun to continue"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            create_stores(spec)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def create_stores(spec: StudySpec) -> None:
    """Create the study's SQLite stores if they are new, one process at a time.

    Two drivers (of different studies) creating one fresh MLflow database at once break its
    schema migration ("duplicate column name: step"); Optuna's tables race the same way.
    The lock sits in a `.locks` folder beside each database, so any study sharing it waits.
    """
    from mlflow import MlflowClient

    from dlsearch.config.stores import tracking_uri
    from dlsearch.search.storage import open_storage

    t = spec.tracking
    for uri, create in (
        (t.uri, lambda: MlflowClient(tracking_uri=tracking_uri(t.uri))),  # its store is made on construction
        (t.optuna_storage, lambda: open_storage(spec)),
    ):
        path = sqlite_path(uri)
        if path is None:
            continue  # a server or a database service creates its own schema
        folder = path.parent / ".locks"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{path.name}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # blocks while another driver creates it
            try:
                create()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative to the cwd), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0]).resolve()


def _writable(where: str, path: Path) -> list[str]:
    if path.exists():
        return [] if os.access(path, os.W_OK) else [f"{where}: cannot write {path} (permission denied)"]
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return [f"{where}: cannot create {path.parent}: {ancestor} is not a folder"]
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return [f"{where}: cannot create {path.parent}: {ancestor} is not writable (permission denied)"]
    return []


def _check_http(where: str, url: str) -> None:
    try:
        with urllib.request.urlopen(url, timeout=5):  # noqa: S310 - the user's own tracking server
            pass
    except urllib.error.HTTPError:
        return  # it answered; auth or routing is MLflow's business
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ServiceUnreachable(f"{where}: cannot reach {url.rsplit('/health', 1)[0]} ({reason})") from None


def _check_credentials(where: str, uri: str) -> None:
    """The server answered /health (never protected); an API call shows whether it takes our credentials."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except MlflowException as err:
        status = err.get_http_status_code()
        if status not in (401, 403):
            return  # not a credentials problem: the run reports it where it happens
        given = [v for v in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
                 if os.environ.get(v)]
        what = f"refused the credentials from {' and '.join(given)}" if given else "needs credentials"
        raise ServiceUnreachable(
            f"{where}: the tracking server at {uri} {what} (HTTP {status}); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account of that server"
        ) from None


def _use_ray_token() -> bool:
    """Send the token in RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH to the cluster; True if one is given.

    Ray itself sends a token to an explicit address only under RAY_AUTH_MODE=token, so that a
    local development token (~/.ray/auth_token) never leaks to another cluster; a token put in
    these variables is meant for the cluster this run names.
    """
    given = bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
    if given and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        try:
            from ray._raylet import Config

            Config.initialize("")  # Ray read its settings when imported: make it read the mode again
        except (ImportError, AttributeError):
            pass
    return given


def _check_ray_token(address: str, token_given: bool) -> None:
    try:
        from ray._raylet import GcsClient  # one RPC to the cluster's GCS; Ray checks the token on it
        from ray.exceptions import AuthenticationError
    except ImportError:
        return
    try:
        GcsClient(address=address)
    except AuthenticationError:
        what = "refused the token from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH" if token_given else (
            "uses token authentication and no token was given")
        raise ServiceUnreachable(
            f"resources.address: the Ray cluster at {address} {what}; set RAY_AUTH_TOKEN to the cluster's token "
            "(or RAY_AUTH_TOKEN_PATH to a file holding it): `ray get-auth-token` prints it on the head node"
        ) from None
    except Exception:  # noqa: BLE001 - anything else surfaces with its own message when Ray connects
        return


def _check_database(where: str, uri: str) -> None:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri, pool_pre_ping=True)
        with engine.connect():
            pass
    except Exception as err:  # noqa: BLE001 - any driver error means unreachable here
        raise ServiceUnreachable(f"{where}: cannot connect ({str(err).splitlines()[0][:200]})") from None
