"""A tracker that records nothing: the driver's MLflow writes, dropped (simulated studies, tests).

It has every method the driver calls on `MlflowTracker`, with the same signature, so the
driver runs unchanged without an MLflow store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from dlsearch.config.trial_config import TrialConfig
from dlsearch.protocol import TrialEnd


class NullTracker:
    """Writes nothing; each trial gets the run id `trial-<number>`."""

    parent_run_id = ""

    def open(self) -> str:
        return self.parent_run_id

    def reconcile_children(self, outcomes: Mapping[int, tuple[str, str, str | None]]) -> int:
        return 0

    def log_best(self, value: float, n_finished: int, number: int | None = None,
                 params: Mapping[str, Any] | None = None) -> None:
        pass

    def finish_study(self, artifacts_dir: Path | None, status: str = "FINISHED") -> None:
        pass

    def start(self, cfg: TrialConfig) -> str:
        return f"trial-{cfg.number}"

    def log_epoch(self, run_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
        pass

    def flush(self, run_id: str | None = None) -> None:
        pass

    def end(
        self, run_id: str, state: str, *, fail_reason: str = "", final: TrialEnd | None = None,
        checkpoint_dir: str | None = None, node: Mapping[str, str] | None = None, population: Sequence[int] = (),
        terminate: bool = True,
    ) -> None:
        pass

    def terminate(self, run_id: str, state: str) -> None:
        pass

    def log_artifacts(self, run_id: str, folder: str | Path) -> None:
        pass

    def register_best(self, run_id: str, model: Any, input_example: Any) -> str | None:
        return None
