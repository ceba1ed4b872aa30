"""`dlsearch ui`: MLflow's server as a child process, its URL printed once it answers.

By default `mlflow server` starts 4 uvicorn workers and a job runner, each importing MLflow
(seconds of CPU apiece): on a 2-core machine the UI first answered after about 45 s. One
worker serves a person's browser (uvicorn answers requests concurrently), and the job runner
only runs GenAI jobs (scorers, trace rollups) that a study never starts, so it is off unless
MLFLOW_SERVER_ENABLE_JOB_EXECUTION says otherwise.

Given a study, the printed link opens its experiment on the runs table (MLflow 3 otherwise
opens its GenAI overview) in the view of the trials that dlsearch saved (tracking/views.py).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from typing import IO

from rich.console import Console

from dlsearch.errors import RunError
from dlsearch.tracking.views import TRAINING_UI, TRIALS_VIEW_ID, TRIALS_VIEW_TAG

_READY_TIMEOUT_S = 180.0  # a loaded machine, a cold disk: well past what a start takes
_POLL_S = 0.25
_STOP_TIMEOUT_S = 20.0  # then the server is killed
_LOG_LINES_KEPT = 40  # of the server's start-up output, shown if it fails to start


class UiFailed(RunError):
    """The MLflow server exited or never answered (exit 1)."""


def serve_ui(backend: str, host: str, port: int, out: Console, progress: Console, study: str | None = None) -> int:
    """Serve the MLflow UI on the tracking store `backend` until Ctrl-C, SIGTERM or SIGHUP.

    Shows progress on `progress` while the server starts, prints its URL on `out` once it
    answers (the page of experiment `study`, if given and there), then passes the server's
    output on to stderr. Returns the server's exit code; raises UiFailed if it exits or does
    not answer within _READY_TIMEOUT_S.
    """
    url = f"http://{_reachable(host)}:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
           "--host", host, "--port", str(port), "--workers", "1"]
    env = {**os.environ}
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # A session of its own: Ctrl-C reaches only this process, which stops the server once.
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    log = _ServerLog(server.stdout)
    previous = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        started = time.monotonic()
        progress.print(f"starting the MLflow UI on {backend} ...", markup=False)
        with progress.status("waiting for the MLflow UI to answer") as status:
            while not _answers(f"{url}/health"):
                waited_s = time.monotonic() - started
                if server.poll() is not None or waited_s > _READY_TIMEOUT_S:
                    log.show(progress)
                    why = (f"exited with code {server.returncode}" if server.poll() is not None
                           else f"did not answer within {_READY_TIMEOUT_S:.0f} s")
                    raise UiFailed(f"the MLflow server {why} (its output is above)")
                status.update(f"waiting for the MLflow UI to answer ({waited_s:.0f} s)")
                time.sleep(_POLL_S)
        page = study_page(url, study) if study else None
        what = f"; the trials of {study}" if page else ""
        out.print(f"MLflow UI: {page or url} (ready after {time.monotonic() - started:.1f} s{what}); Ctrl-C stops it",
                  markup=False)
        log.pass_through()
        return server.wait()
    except KeyboardInterrupt:
        return 0  # how a person stops the UI
    finally:
        _stop(server)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def study_page(url: str, study: str) -> str | None:
    """The link to experiment `study` on the MLflow server at `url`: its runs table in the trials
    view if dlsearch saved one; None if there is no such experiment (yet)."""
    query = urllib.parse.urlencode({"experiment_name": study})
    try:
        with urllib.request.urlopen(f"{url}/ajax-api/2.0/mlflow/experiments/get-by-name?{query}", timeout=30) as r:
            experiment = json.loads(r.read())["experiment"]
    except OSError:  # 404: not in this store
        return None
    view = any(t["key"] == TRIALS_VIEW_TAG for t in experiment.get("tags", []))
    return (f"{url}/#/experiments/{experiment['experiment_id']}/runs?{TRAINING_UI}"
            + (f"&viewStateShareKey={TRIALS_VIEW_ID}" if view else ""))


class _ServerLog:
    """Reads the server's output in a thread: keeps the last lines while it starts, then echoes to stderr."""

    def __init__(self, stream: IO[str] | None):
        self.lines: collections.deque[str] = collections.deque(maxlen=_LOG_LINES_KEPT)
        self.echo = False
        if stream is not None:
            threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def pass_through(self) -> None:
        self.echo = True

    def show(self, console: Console) -> None:
        time.sleep(_POLL_S)  # the last lines of a server that just exited
        for line in list(self.lines):
            console.print(line, markup=False, highlight=False)

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            if self.echo:
                sys.stderr.write(line)
                sys.stderr.flush()
            else:
                self.lines.append(line.rstrip("\n"))


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:  # refused while it starts; URLError, timeouts and HTTP errors are OSErrors
        return False


def _reachable(host: str) -> str:
    """Where this machine reaches a server bound to `host` (a wildcard address is reached on loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM and SIGHUP stop the UI the way Ctrl-C does


def _stop(server: subprocess.Popen[str]) -> None:
    """SIGTERM (MLflow passes it on to its worker), then SIGKILL if it lingers."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
