"""Every error dlsearch shows a person, under one base that carries its exit code (SPEC).

`DlsearchError.lines()` is what the CLI prints, one line each, with no traceback
(unless `--debug`); `exit_code` is what it exits with. Control flow inside a trial
(`TrialPruned`, `TrialFailed`) is not here: it never reaches a person as such.
"""

from __future__ import annotations

EXIT_FAILED = 1  # the run could not go on
EXIT_INPUT = 2  # the input is wrong; nothing was written
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C or SIGTERM after the state was saved


class DlsearchError(Exception):
    """The base of every error that ends a command; `exit_code` says how."""

    exit_code = EXIT_FAILED
    # The key a message is about when the message itself does not start with one (e.g. "data").
    key: str | None = None

    def lines(self) -> list[str]:
        text = str(self)
        if self.key and not text.startswith(self.key.split(".")[0] + "."):
            text = f"{self.key}: {text}"
        return text.splitlines() or [type(self).__name__]


class InputError(DlsearchError):
    """The input is wrong (a study file, a `--set`, missing data, a source): exit 2."""

    exit_code = EXIT_INPUT


class RunError(DlsearchError):
    """The run could not go on (every trial failed, a store or a cluster unreachable): exit 1."""

    exit_code = EXIT_FAILED


class InterruptedRun(DlsearchError):
    """Stopped by SIGINT/SIGTERM after the state was saved: exit 130."""

    exit_code = EXIT_INTERRUPTED
