"""`dlsearch run` as a person sees it in a terminal: a real pseudo-terminal (pexpect), the real CLI.

What is on the screen, and when: the study's header within about 2 s, each phase named while it
happens, trials counted from epoch 1, no ETA before one is measured, the result then the end's
phases; Ctrl-C (SIGINT through the terminal, to the whole foreground process group as a key
press sends it) and the counts the stopped run and its resume say, which must agree; the
command printed to continue is the one that continues; a second Ctrl-C leaves no table line
unfinished. Real Ray, Optuna and MLflow.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from pathlib import Path

import optuna
import pexpect
import pytest
from optuna.trial import TrialState

from dlsearch.config.spec import load_spec
from tests.studies import write_study

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# The header comes from the CLI before it imports Ray, Optuna's storages or MLflow (seconds): 2 s is
# the goal, the rest is slack for a loaded 2-core machine (Python and click start in ~0.5 s there).
FIRST_OUTPUT_S = 3.0
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]")
_STATUS = re.compile(r"(\d+)/(\d+) finished(?: \((\d+) before this run\))? \| running (\d+) \| complete (\d+) \| "
                     r"pruned (\d+) \| failed (\d+) \| best \S+ \S+ \| elapsed [\d:]+ \| ETA (\S+)")
_ROW = re.compile(r"│\s+(\d+) │\s+(\S+) │")  # a running trial's row: trial number, epoch
_STOPPED = re.compile(r"stopped: (\d+) finished trials are saved; (\d+) interrupted trials? will run again")


class Terminal:
    """`python -m dlsearch ARGS` on a pseudo-terminal; everything it wrote, and when."""

    def __init__(self, args: list[str], cwd: Path):
        self.started = time.monotonic()
        self.child = pexpect.spawn(sys.executable, ["-m", "dlsearch", *args], cwd=str(cwd), encoding="utf-8",
                                   env={**os.environ, "PYTHONPATH": str(ROOT)}, dimensions=(60, 220))
        self.raw = ""
        self.first_output_s: float | None = None

    @property
    def text(self) -> str:
        """The output without terminal escapes (colours, cursor moves), lines ending in \\n."""
        return _ESCAPES.sub("", self.raw).replace("\r\n", "\n")

    def wait_for(self, pattern: str, timeout_s: float = 400) -> re.Match:
        """Read until `pattern` (a regex) matches the output so far, or fail."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = re.search(pattern, self.text)
            if found:
                return found
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} in {timeout_s} s; the screen so far:\n{self.text[-3000:]}"
            try:
                self._take(self.child.read_nonblocking(100_000, timeout=min(left, 5)))
            except pexpect.TIMEOUT:
                pass
            except pexpect.EOF:
                found = re.search(pattern, self.text)
                assert found, f"exited before {pattern!r}; the screen:\n{self.text[-3000:]}"
                return found

    def finish(self, timeout_s: float = 400) -> int:
        """Read to the end; the exit status."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert time.monotonic() < deadline, f"still running after {timeout_s} s:\n{self.text[-3000:]}"
            try:
                self._take(self.child.read_nonblocking(100_000, timeout=5))
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                break
        self.child.close()
        return self.child.exitstatus if self.child.exitstatus is not None else 128 + self.child.signalstatus

    def _take(self, chunk: str) -> None:
        if chunk.strip() and self.first_output_s is None:
            self.first_output_s = time.monotonic() - self.started
        self.raw += chunk

    def screen(self) -> list[str]:
        """The lines a person sees at the end (scrollback included): the output played on a tiny
        terminal that knows what rich's live display uses (carriage return, cursor up, erase line)."""
        lines, row, col = [""], 0, 0
        for token in re.finditer(r"\x1b\[([0-9;?]*)([ -/]*[@-~])|\x1b[()=>][0-9A-Za-z]?|[\s\S]", self.raw):
            if token.group(2):  # a control sequence: move or erase; colours and cursor visibility change nothing here
                n = int(token.group(1)) if token.group(1).isdigit() else 1
                if token.group(2) == "A":
                    row = max(0, row - n)
                elif token.group(2) == "K":
                    lines[row] = "" if token.group(1) == "2" else lines[row][:col]
                elif token.group(2) == "G":
                    col = n - 1
                continue
            char = token.group(0)
            if char.startswith("\x1b"):
                continue
            if char == "\n":  # the terminal's onlcr: a new line starts at column 0
                row, col = row + 1, 0
                lines += [""] * (row + 1 - len(lines))
            elif char == "\r":
                col = 0
            elif char == "\b":
                col = max(0, col - 1)
            elif char.isprintable():
                line = lines[row].ljust(col)
                lines[row] = line[:col] + char + line[col + 1:]
                col += 1
        return lines


def statuses(text: str) -> list[dict[str, int | str]]:
    """Every status line drawn, in order."""
    keys = ("finished", "budget", "before", "running", "complete", "pruned", "failed")
    return [{**{k: int(v or 0) for k, v in zip(keys, m.groups()[:7])}, "eta": m.group(8)}
            for m in _STATUS.finditer(text)]


def epochs_shown(text: str) -> dict[int, list[str]]:
    """Trial number -> the epoch cells its row showed, in order."""
    shown: dict[int, list[str]] = {}
    for number, epoch in _ROW.findall(text):
        cells = shown.setdefault(int(number), [])
        if not cells or cells[-1] != epoch:
            cells.append(epoch)
    return shown


def assert_epochs_count_from_one(text: str) -> None:
    shown = epochs_shown(text)
    assert shown, text[-2000:]
    for number, cells in shown.items():
        numbers = [int(c) for c in cells if c.isdigit()]
        assert "0" not in cells, f"trial {number} shown at epoch 0: {cells}"
        assert set(cells) - {"starting"} == {str(n) for n in numbers}, cells
        assert not numbers or numbers[0] == 1, f"trial {number}'s first epoch shown: {cells}"


def test_live_progress_ctrl_c_and_the_resume_agree(tmp_path: Path) -> None:
    # One trial at a time, no pruning: trial 0 ends, trial 1 runs when Ctrl-C comes. The file says 2
    # trials, the command line 3; --fresh on a study not stored yet starts it (version 1).
    study = write_study(tmp_path, budget={"trials": 2}, pruner={"type": "none"},
                        train={"epochs": 20, "batch_size": 64, "early_stopping": {"patience": 20}},
                        resources={"cpus_per_trial": 1, "max_concurrent": 1})
    first = Terminal(["run", study.name, "--trials", "3", "--fresh"], tmp_path)
    first.wait_for(r"study e2e-digits: .*\n")
    assert first.first_output_s is not None and first.first_output_s < FIRST_OUTPUT_S, first.first_output_s
    assert "3 trials x <= 20 epochs" in first.text  # --trials, not the file's 2
    # Trial 1 a few epochs in, after trial 0 ended: Ctrl-C.
    first.wait_for(r"1/3 finished [^\n]*\n(?:[^\n]*\n){3}│\s+1 │\s+(?:[3-9]|1\d) │")
    first.child.sendintr()
    assert first.finish() == 130, first.text[-3000:]
    screen = first.text
    phases = ["importing Ray Tune and MLflow", "checking the study's stores and loading the data (digits)",
              "starting Ray on this machine", "starting trials", "interrupted: saving the study's state"]
    at = [screen.find(p) for p in phases]
    assert -1 not in at and at == sorted(at), list(zip(phases, at))
    assert screen.find("study e2e-digits") < at[0]  # the header before the heavy imports
    assert_epochs_count_from_one(screen)
    for status in statuses(screen):
        assert status["complete"] + status["pruned"] + status["failed"] == status["finished"], status
        if status["finished"] == 0:
            assert status["eta"] == "-", f"an ETA before any trial ended: {status}"
    assert any(s["eta"] != "-" for s in statuses(screen)), "an ETA once a trial ended"

    stopped = _STOPPED.search(screen)
    assert stopped, screen[-2000:]
    n_finished, n_again = int(stopped.group(1)), int(stopped.group(2))
    assert n_finished == 1 and n_again == 1, stopped.group(0)
    spec = load_spec(study)
    s = optuna.load_study(study_name=spec.name, storage=spec.tracking.optuna_storage)
    assert len(s.get_trials(states=(TrialState.WAITING,))) == n_again
    assert not s.get_trials(states=(TrialState.RUNNING,))
    # The command it says continues the study: without --fresh, which would start a version 2.
    said = re.search(r"to continue this version, run it without --fresh: (dlsearch run .*)\n", screen)
    assert said, screen[-2000:]
    command = shlex.split(said.group(1))
    assert command == ["dlsearch", "run", study.name, "--trials", "3"]

    again = Terminal(command[1:], tmp_path)
    assert again.finish() == 0, again.text[-3000:]
    screen = again.text
    resumed = re.search(r"resuming e2e-digits: (\d+) of 3 trials already finished; (\d+) interrupted trials? "
                        r"will run again", screen)
    assert resumed, screen[:3000]
    assert (int(resumed.group(1)), int(resumed.group(2))) == (n_finished, n_again)
    assert "a killed run left running" not in screen  # nothing the stopped run did not say
    assert_epochs_count_from_one(screen)
    shown = statuses(screen)
    assert shown and all(st["before"] == n_finished for st in shown), "the study's totals, and how many came before"
    for status in shown:
        assert status["complete"] + status["pruned"] + status["failed"] == status["finished"], status
        if status["finished"] == n_finished:
            assert status["eta"] == "-", f"an ETA before a trial of this run ended: {status}"
    assert shown[0]["complete"] == n_finished  # counts on from the study's, not from 0
    assert shown[-1]["finished"] == 3 and shown[-1]["running"] == 0
    # The result first, then each end phase named while it runs, then the commands to look further.
    end = [screen.find(p) for p in ("e2e-digits: 3 trials finished", "2 of them in this run",
                                    "writing the leaderboard, importances and plots",
                                    "registering the best model as e2e-digits@best", "compare the trials:")]
    assert -1 not in end and end == sorted(end), end
    s = optuna.load_study(study_name=spec.name, storage=spec.tracking.optuna_storage)
    finished = [t for t in s.trials if t.state.is_finished() and t.user_attrs.get("fail_reason") != "interrupted"]
    assert len(finished) == 3 and optuna.get_all_study_names(spec.tracking.optuna_storage) == ["e2e-digits"]


def test_a_second_ctrl_c_leaves_no_line_unfinished(tmp_path: Path) -> None:
    study = write_study(tmp_path, budget={"trials": 2}, pruner={"type": "none"},
                        train={"epochs": 200, "batch_size": 64, "early_stopping": {"patience": 200}},
                        resources={"cpus_per_trial": 1, "max_concurrent": 1})
    run = Terminal(["run", study.name], tmp_path)
    run.wait_for(r"│\s+0 │\s+[1-9]\d* │")
    run.child.sendintr()
    run.wait_for(r"interrupted: saving")
    run.child.sendintr()  # while the first one's state is being saved
    assert run.finish() == 130, run.text[-3000:]
    screen = run.screen()
    shown = "\n".join(screen)
    # The table's last line ends with its border (the terminal's echo of the key aside), and what
    # the run says last starts a line of its own.
    bottoms = [line.rstrip() for line in screen if "┘" in line]
    assert bottoms, shown
    for line in bottoms:
        assert re.fullmatch(r"└[─┴]+┘(\^C)*", line), repr(line)
    last = [line.replace("^C", "").strip() for line in screen if line.replace("^C", "").strip()][-1]
    assert last == "interrupted" or _STOPPED.match(last), shown[-1500:]
