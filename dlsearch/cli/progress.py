"""Terminal output for people: a live per-epoch table and small text plots.

On a terminal the table redraws in place; elsewhere (a log file, CI) each
epoch is one plain line, so logs stay readable.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

_BARS = "▁▂▃▄▅▆▇█"
_COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_time_s")
_NOT_SHOWN = ("generalization_gap",)  # the built-in loop's metric left out of the table (val_loss - train_loss)


class EpochTable:
    """Context manager; `add(epoch, metrics)` is a report callable for `train_trial`."""

    def __init__(self, console: Console, title: str = ""):
        self.console = console
        self.title = title
        self.rows: list[tuple[int, Mapping[str, float]]] = []
        self.columns: list[str] = list(_COLUMNS)  # a custom trainable's own metrics are appended
        self._live: Live | None = None

    def __enter__(self) -> "EpochTable":
        if self.console.is_terminal:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4)
            self._live.__enter__()
        elif self.title:
            self.console.print(self.title, markup=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def add(self, epoch: int, metrics: Mapping[str, float], checkpoint: dict | None = None) -> None:
        self.rows.append((epoch, dict(metrics)))
        for column in (c for c in metrics if c not in self.columns and c not in _NOT_SHOWN):
            self.columns.insert(self.columns.index("epoch_time_s"), column)  # the time stays last
        if self._live is not None:
            self._live.update(self._render())
        else:
            cells = [f"{c}={_fmt(c, metrics[c])}" for c in self.columns[1:] if c in metrics]
            self.console.print(f"epoch {epoch}: " + " ".join(cells), markup=False)

    def _render(self) -> Table:
        table = Table(title=self.title or None, title_justify="left")
        columns = ([c for c in self.columns if c == "epoch" or any(c in m for _, m in self.rows)] if self.rows
                   else self.columns)
        for column in columns:
            table.add_column(column, justify="right")
        for epoch, metrics in self.rows:
            table.add_row(str(epoch), *(_fmt(c, metrics.get(c)) for c in columns[1:]))
        return table


def sparkline(values: list[float], width: int = 60) -> str:
    """The curve as one line of block characters, with its first and last value."""
    finite = [v for v in values if v == v and abs(v) != float("inf")]
    if not finite:
        return "(no finite values)"
    step = max(1, len(values) // width)
    sampled = values[::step]
    low, high = min(finite), max(finite)
    span = (high - low) or 1.0
    bars = "".join(
        _BARS[min(len(_BARS) - 1, int((v - low) / span * len(_BARS)))] if v in finite else "!" for v in sampled
    )
    return f"{values[0]:.3g} {bars} {values[-1]:.3g}"


def _fmt(column: str, value: float | None) -> str:
    if value is None:
        return ""
    if column == "lr":
        return f"{value:.2e}"
    if column == "epoch_time_s":
        return f"{value:.2f}"
    return f"{value:.4f}"


class StudyProgress:
    """Live progress of a study run: an `on_event` callable for `run_study`.

    Each phase of the run is a line as it begins (checking, starting Ray, writing plots, ...).
    Then, on a terminal, a live table of the running trials under a status line (finished of
    the budget, running, complete / pruned / failed, best so far, elapsed, ETA); elsewhere one
    plain line per finished trial with the same status. The counts are the study's: a resumed
    run counts on from the trials finished before it, and says how many those were.
    """

    def __init__(self, console: Console, objective: str,
                 on_summary: Callable[[Any], None] | None = None, started: float | None = None):
        self.console = console
        self.objective = objective
        self.on_summary = on_summary  # prints the study's result as soon as its trials are done
        self.started = time.monotonic() if started is None else started  # elapsed counts from here
        self.counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}  # the study's finished trials by state
        self.running: dict[int, dict] = {}
        self.best: float | None = None
        self.budget = 0
        self.finished_before = 0  # trials the study had finished when this run opened it
        # This run's measurements, the ETA's only inputs: when its first epoch came in, the epochs
        # its trials reported, and how many epochs each trial that ended ran.
        self.first_epoch_s: float | None = None
        self.n_epochs = 0
        self.ended_epochs: list[int] = []
        self._live: Live | None = None

    def __call__(self, kind: str, info: Mapping) -> None:
        if kind == "start":
            self.budget = info["budget"]
        elif kind == "phase":  # what the run does now, as it begins: a line that stays
            # A styled Text, not print(style=...): above a live table, that style would dim the table too.
            self.console.print(Text(info["line"], style="dim"))
        elif kind == "opened":
            self._on_opened(info)
        elif kind == "trial_start":
            self.running[info["number"]] = {"epoch": None, "value": None, "params": info["params"]}
        elif kind == "epoch":
            self.first_epoch_s = self.first_epoch_s or time.monotonic()
            self.n_epochs += 1
            row = self.running.get(info["number"])
            if row is not None:
                row["epoch"], row["value"] = info["epoch"], info["metrics"].get(self.objective)
        elif kind == "trial_end":
            self.running.pop(info["number"], None)
            self.counts[info["state"]] = self.counts.get(info["state"], 0) + 1
            self.ended_epochs.append(info["epochs"])
            self.best = info["best"] if info["best"] is not None else self.best
            if self._live is None or info["state"] == "FAIL":  # the table shows no ended trial: say a failure
                self.console.print(self._trial_line(info), markup=False)
        elif kind == "trial_retry":  # its worker died; Tune runs it again (Ray's own report stays in its logs)
            self.console.print(_retry_line(info), markup=False)
        elif kind in ("warning", "cluster"):  # before the study starts: a node left out, what workers get
            self.console.print(info["line"], markup=False)
        elif kind == "trial_requeued":  # ran out of memory: runs again with more resources, not counted
            self.running.pop(info["number"], None)
            self.console.print(f"trial {info['number']}: {info['reason']}", markup=False)
        elif kind in ("summary", "end"):
            self.close()
            if kind == "summary" and self.on_summary is not None:
                self.on_summary(info["summary"])
            return
        if self._live is not None:
            self._live.refresh()

    def close(self) -> None:
        """Stop the live table, leaving it drawn and the cursor on a new line (also after a second Ctrl-C)."""
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def _on_opened(self, info: Mapping) -> None:
        self.budget, self.finished_before = info["budget"], info["finished"]
        self.counts = {state: info.get(state, 0) for state in self.counts}
        self.best = info.get("best")
        if info.get("fresh"):
            self.console.print(f"starting a fresh version of the study: {info['version']}", markup=False)
        elif info.get("resumed"):
            line = f"resuming {info['version']}: {info['finished']} of {info['budget']} trials already finished"
            if info.get("reopened"):
                line += f"; closed {info['reopened']} trial(s) a killed run left running"
            if info.get("rerun"):
                from dlsearch.tuner.runner import n_will_run_again  # loaded: the event comes from it

                line += f"; {n_will_run_again(info['rerun'])}"
            self.console.print(line, markup=False)
        if info["remaining"] <= 0:
            self.console.print(f"the budget of {info['budget']} trials is already spent; "
                               "raise it with --trials N", markup=False)
        elif self.console.is_terminal:
            # A renderable that redraws from the current state, so elapsed and ETA tick between events.
            self._live = Live(_Redraw(self._render), console=self.console, refresh_per_second=2)
            self._live.start()

    def _status(self) -> str:
        finished = sum(self.counts.values())
        before = f" ({self.finished_before} before this run)" if self.finished_before else ""
        best = "-" if self.best is None else f"{self.best:.4f}"
        eta = self._eta_s()
        return (f"{finished}/{self.budget} finished{before} | running {len(self.running)} | "
                f"complete {self.counts['COMPLETE']} | pruned {self.counts['PRUNED']} | "
                f"failed {self.counts['FAIL']} | best {self.objective} {best} | "
                f"elapsed {clock(self.elapsed_s())} | ETA {'-' if eta is None else clock(eta)}")

    def _eta_s(self) -> float | None:
        """Seconds until the budget is done, from this run's measured pace: epochs per second since
        its first epoch came in (the workers' start before it is paid once), times the epochs left
        (a trial to start runs as many as the trials that ended in this run did on average; a
        running one, what is left of that). None until a trial ended in this run: before, nothing
        says how many epochs a trial runs."""
        if not self.ended_epochs or self.n_epochs < 2 or self.first_epoch_s is None:
            return None
        pace = (self.n_epochs - 1) / max(time.monotonic() - self.first_epoch_s, 1e-9)
        per_trial = sum(self.ended_epochs) / len(self.ended_epochs)
        to_start = max(0, self.budget - sum(self.counts.values()) - len(self.running))
        left = to_start * per_trial + sum(max(0.0, per_trial - (row["epoch"] or 0)) for row in self.running.values())
        return left / pace

    def _trial_line(self, info: Mapping) -> str:
        what = info["state"]
        if info["value"] is not None:
            what += f" {self.objective}={info['value']:.4f}"
        if info["reason"]:
            what += f" ({info['reason']})"
        return f"trial {info['number']}: {what} after {info['epochs']} epochs | {self._status()}"

    def _render(self) -> Table:
        finished = sum(self.counts.values())
        waiting = not self.running and finished < self.budget
        table = Table(title=self._status(), title_justify="left",
                      caption="starting trials" if waiting else None, caption_justify="left")
        for column in ("trial", "epoch", self.objective, "params"):
            table.add_column(column, justify="right" if column != "params" else "left")
        for number, row in sorted(self.running.items()):
            params = ", ".join(f"{k.split('.')[-1]}={short_value(v)}" for k, v in row["params"].items())
            value = "" if row["value"] is None else f"{row['value']:.4f}"
            # Until its first epoch is in, a trial's worker is loading the data (and on its first trial, torch).
            epoch = "starting" if row["epoch"] is None else str(row["epoch"])
            table.add_row(str(number), epoch, value, params)
        return table


def _retry_line(info: Mapping) -> str:
    """One line for a trial Tune runs again after its worker failed (Ray's traceback stays in its logs)."""
    numbers = info["numbers"]
    who = f"trial {numbers[0]}" if len(numbers) == 1 else f"trials {', '.join(map(str, numbers))} (one population)"
    when = f" at epoch {info['last_epoch']}" if info["last_epoch"] >= 0 else ""
    limit = "" if info["max_retries"] < 0 else f" of {info['max_retries']}"
    start = "the start" if info["from_epoch"] is None else f"the checkpoint of epoch {info['from_epoch']}"
    return (f"{who}: {info['what']}{when}; retry {info['retry']}{limit} from {start} "
            f"(details in Ray's logs)")


class _Redraw:
    """A rich renderable that calls `render()` each time Live draws it."""

    def __init__(self, render: Callable[[], Table]):
        self._render = render

    def __rich__(self) -> Table:
        return self._render()


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def short_value(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
