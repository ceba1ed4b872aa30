"""Terminal output for people: a live per-epoch table and small text plots.

On a terminal the table redraws in place; elsewhere (a log file, CI) each
epoch is one plain line, so logs stay readable.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from rich.console import Console
from rich.live import Live
from rich.table import Table

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

    On a terminal: a live panel (running / complete / pruned / failed, best so
    far, elapsed, ETA) and a table of the running trials. Elsewhere: one plain
    line per finished trial.
    """

    def __init__(self, console: Console, objective: str,
                 on_summary: Callable[[Any], None] | None = None):
        self.console = console
        self.objective = objective
        self.on_summary = on_summary  # prints the study's result as soon as its trials are done
        self.counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
        self.running: dict[int, dict] = {}
        self.best: float | None = None
        self.budget = 0
        self.finished_before = 0
        self.started = 0.0
        self._live: Live | None = None

    def __call__(self, kind: str, info: Mapping) -> None:
        import time

        if kind == "start":
            self.started = time.monotonic()
            self.budget, self.finished_before = info["budget"], info["finished"]
            self._say_start(info)
            if self.console.is_terminal and info["remaining"] > 0:
                # A renderable that redraws from the current state, so elapsed and ETA tick between events.
                self._live = Live(_Redraw(self._render), console=self.console, refresh_per_second=2)
                self._live.__enter__()
        elif kind == "trial_start":
            self.running[info["number"]] = {"epoch": 0, "value": None, "params": info["params"]}
        elif kind == "epoch":
            row = self.running.get(info["number"])
            if row is not None:
                row["epoch"], row["value"] = info["epoch"], info["metrics"].get(self.objective)
        elif kind == "trial_end":
            self.running.pop(info["number"], None)
            self.counts[info["state"]] = self.counts.get(info["state"], 0) + 1
            self.best = info["best"] if info["best"] is not None else self.best
            if self._live is None:
                self.console.print(self._trial_line(info), markup=False)
        elif kind in ("warning", "cluster"):  # before the study starts: a node left out, what workers get
            self.console.print(info["line"], markup=False)
        elif kind == "trial_requeued":  # ran out of memory: runs again with more resources, not counted
            self.running.pop(info["number"], None)
            self.console.print(f"trial {info['number']}: {info['reason']}", markup=False)
        elif kind in ("summary", "end"):
            if self._live is not None:
                self._live.__exit__(None, None, None)
                self._live = None
            if kind == "summary" and self.on_summary is not None:
                self.on_summary(info["summary"])
            return
        elif kind == "phase":  # the study's end: what it is writing, while it writes
            self.console.print(info["line"], style="dim", markup=False)
        if self._live is not None:
            self._live.refresh()

    def _say_start(self, info: Mapping) -> None:
        if info.get("fresh"):
            self.console.print(f"starting a fresh version of the study: {info['version']}", markup=False)
        elif info.get("resumed"):
            line = f"resuming {info['version']}: {info['finished']} of {info['budget']} trials already finished"
            if info.get("reopened"):
                line += f"; closed {info['reopened']} trial(s) a killed run left running"
            if info.get("rerun"):
                line += f"; {info['rerun']} interrupted trial(s) will run again"
            self.console.print(line, markup=False)
        if info["remaining"] <= 0:
            self.console.print(f"the budget of {info['budget']} trials is already spent; "
                               "raise it with --trials N", markup=False)

    def _status(self) -> str:
        import time

        done_now = sum(self.counts.values())
        finished = self.finished_before + done_now
        elapsed = time.monotonic() - self.started
        eta = elapsed / done_now * (self.budget - finished) if done_now else None
        best = "-" if self.best is None else f"{self.best:.4f}"
        return (f"{finished}/{self.budget} finished | running {len(self.running)} | "
                f"complete {self.counts['COMPLETE']} | pruned {self.counts['PRUNED']} | "
                f"failed {self.counts['FAIL']} | best {self.objective} {best} | "
                f"elapsed {_clock(elapsed)} | ETA {_clock(eta) if eta is not None else '-'}")

    def _trial_line(self, info: Mapping) -> str:
        what = info["state"]
        if info["value"] is not None:
            what += f" {self.objective}={info['value']:.4f}"
        if info["reason"]:
            what += f" ({info['reason']})"
        return f"trial {info['number']}: {what} after {info['epochs']} epochs | {self._status()}"

    def _render(self) -> Table:
        table = Table(title=self._status(), title_justify="left")
        for column in ("trial", "epoch", self.objective, "params"):
            table.add_column(column, justify="right" if column != "params" else "left")
        for number, row in sorted(self.running.items()):
            params = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in row["params"].items())
            value = "" if row["value"] is None else f"{row['value']:.4f}"
            table.add_row(str(number), str(row["epoch"]), value, params)
        return table


class _Redraw:
    """A rich renderable that calls `render()` each time Live draws it."""

    def __init__(self, render: Callable[[], Table]):
        self._render = render

    def __rich__(self) -> Table:
        return self._render()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
