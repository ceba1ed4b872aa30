"""What a trial and the driver say to each other: typed messages, and the one place that knows their keys.

The driver hands a Tune trial an `Assignment` (one Optuna trial, or a population of
them, as Tune's `config`). The trial answers with reports, each carried by a Tune
result under the one key `REPORT_KEY`, so that no metric a trial names can collide
with Tune's own keys:

- `EpochReport`: one epoch of one trial (the built-in loop's or a custom trainable's metrics);
- `PopulationEpoch`: one round of a population: an epoch of each member, by trial number, each
  at its own epoch (a member that joined later is behind), and the members that ended in it;
- `TrialEnd`: how a trial (or, in a `PopulationEnd`, each member) ended: its state, the
  reason of a failure, its best and last epochs' metrics, its test metrics.

The driver answers with prune decisions: for a single trial, Tune's STOP (the trial
raises out of `report`); for a population, a `RoundAnswer` posted to the study's board:
the members to stop and the newcomers that take the free slots. The files of a trial's
checkpoints are named here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Union

REPORT_KEY = "dlsearch"  # the key of a Tune result that holds a trial's report

# Inside a trial's Tune checkpoints.
STATE_FILE = "state.pt"  # resume state
MODEL_DIR = "model"  # the final checkpoint's model files, logged to MLflow as the trial's checkpoint
BEST_FILE = "best.pt"  # the best epoch's weights (built-in loop)
LAST_FILE = "last.pt"  # a custom trainable's last checkpoint
MEMBERS_DIR = "members"  # a population's checkpoint: members/<number>/model/best.pt of members that completed
ARTIFACTS_DIR = "artifacts"  # files a custom trainable logged


# ---------------------------------------------------------------- driver -> trial


@dataclass(frozen=True)
class Member:
    """One Optuna trial a Tune trial runs: its number and sampled values by dotted path."""

    number: int
    params: dict[str, Any]


@dataclass(frozen=True)
class Assignment:
    """What one Tune trial runs: one member, or several trained as one stacked model (a population,
    whose prune decisions come through the board actor `board` under the key `population`)."""

    members: list[Member]
    resources_scale: float = 1  # times the per-trial resources (doubled after running out of memory)
    population: str = ""  # the Tune trial id keying the population's posts on the board
    board: str = ""  # the name of the board actor

    @property
    def is_population(self) -> bool:
        return bool(self.population)

    def to_config(self) -> dict[str, Any]:
        """As Tune's trial `config` (plain data: Tune names trials and folders after it)."""
        config: dict[str, Any] = {"members": [{"number": m.number, "params": dict(m.params)} for m in self.members]}
        if self.resources_scale != 1:
            config["resources_scale"] = self.resources_scale
        if self.population:
            config.update(population=self.population, board=self.board)
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Assignment:
        return cls(
            members=[Member(int(m["number"]), dict(m["params"])) for m in config["members"]],
            resources_scale=float(config.get("resources_scale", 1)),
            population=str(config.get("population", "")),
            board=str(config.get("board", "")),
        )


def resources_scale(config: Mapping[str, Any]) -> float:
    """The resources a Tune trial's `config` asks for, times the per-trial share."""
    return float(config.get("resources_scale", 1))


# ---------------------------------------------------------------- trial -> driver


@dataclass(frozen=True)
class EpochReport:
    """One epoch of one trial: every metric it reported (name -> number), at `step=epoch`."""

    epoch: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class PopulationEpoch:
    """One round of a population: each member that trained in it, by trial number, at its own epoch.

    `ended` holds the members that ended in the round on their own (COMPLETE: epochs done or
    early stopping; FAIL: diverged); a completed member's best weights are in the checkpoint
    that goes with the report (`checkpointed`), under `members/<number>/model/best.pt`.
    """

    round: int  # rounds the population has run (1, 2, ...): a restarted worker repeats some
    members: dict[int, dict[str, float]]
    epochs: dict[int, int] = field(default_factory=dict)  # each member's own epoch
    ended: dict[int, "TrialEnd"] = field(default_factory=dict)
    # A checkpoint goes with this report; when a member completed in the round, the driver closes it
    # and answers once it has that checkpoint (the member's weights are in it).
    checkpointed: bool = False

    @property
    def epoch(self) -> int:
        """Tune's view of progress: the population's round."""
        return self.round


@dataclass(frozen=True)
class TrialEnd:
    """How one trial ended, in its last report (never an epoch: never pruned on)."""

    state: str  # COMPLETE | FAIL (a pruned trial never sends one: the driver stopped it)
    fail_reason: str = ""
    out_of_memory: bool = False
    epochs_run: int = 0
    best_epoch: int = 0
    overfit_epoch: int = 0
    test_loss: float | None = None
    test_accuracy: float | None = None
    epoch_time_s: float | None = None  # the median epoch's
    best_metrics: dict[str, float] = field(default_factory=dict)  # the best epoch's (the trial's value)
    final_metrics: dict[str, float] = field(default_factory=dict)  # returned by a custom trainable at its end
    traceback: str = ""  # where an exception of the user's own code came from (MLflow's fail-reason tag)

    @classmethod
    def failed(cls, reason: str, out_of_memory: bool = False, traceback: str = "") -> TrialEnd:
        return cls(state="FAIL", fail_reason=reason[:500], out_of_memory=out_of_memory, traceback=traceback[-4000:])

    @classmethod
    def of(cls, result: Any) -> TrialEnd:
        """From a `dlsearch.trial.train.TrialResult` (or anything with its fields)."""
        return cls(
            state=result.state, fail_reason=result.fail_reason or "", epochs_run=result.epochs_run,
            best_epoch=result.best_epoch or 0, overfit_epoch=result.overfit_epoch or 0,
            test_loss=result.test_loss, test_accuracy=result.test_accuracy, epoch_time_s=result.epoch_time_s,
            best_metrics=dict(result.best_metrics), final_metrics=dict(result.final_metrics),
        )


@dataclass(frozen=True)
class RoundAnswer:
    """The driver's answer to a population's round, posted to the board: the members to stop
    (pruned), and newly asked trials that join at their epoch 1 in the slots set free."""

    stop: list[int] = field(default_factory=list)
    add: list[Member] = field(default_factory=list)


@dataclass(frozen=True)
class PopulationEnd:
    """How the members still training ended when the population stopped at once (an exception)."""

    members: dict[int, TrialEnd]


Report = Union[EpochReport, PopulationEpoch, TrialEnd, PopulationEnd]


def to_result(report: Report, place: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A Tune result carrying `report`, and where it ran (`Place.of`: the Ray node, the GPUs and share)."""
    result: dict[str, Any] = {REPORT_KEY: report, **(place or {})}
    if isinstance(report, (EpochReport, PopulationEpoch)):
        result["epoch"] = report.epoch  # Tune's own view of progress
    return result


PLACE_KEYS = ("node_id", "node_ip", "hostname", "gpu_ids", "gpu_share", "gpu_memory_fraction")  # Tune adds ip, host


def from_result(result: Mapping[str, Any]) -> Report | None:
    """The report a Tune result carries; None for a result of Tune's own."""
    report = result.get(REPORT_KEY)
    return report if isinstance(report, (EpochReport, PopulationEpoch, TrialEnd, PopulationEnd)) else None
