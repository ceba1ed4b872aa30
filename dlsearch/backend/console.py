"""What Ray prints on the driver's console about a trial's failure, and why dlsearch keeps it off.

A trial whose worker dies (killed, out of memory, a segfault) reaches the console three ways,
each many lines long, while the driver already says it in one line (`tuner.runner` emits
"trial_retry", or the trial ends FAIL with its reason):

- the raylet's notice "A worker died or was killed while executing a task ...", pushed to every
  driver of the job and printed by `ray._private.worker.listen_error_messages`, a thread that
  `log_to_driver=False` does not stop and no setting turns off;
- Tune's "Trial task failed for trial ..." with the `ActorDiedError` traceback, logged by
  `ray.tune.execution.tune_controller` unless `TUNE_PRINT_ALL_TRIAL_ERRORS=0`;
- Tune's "Trials did not complete: [...]" at the end (`ray.tune.tune`), for trials dlsearch
  already closed as FAIL.

The details stay where Ray keeps them: the trial's `error.txt` in Tune's storage path and the
session's logs (`/tmp/ray/session_latest/logs`). Every other raylet notice is printed as before.
"""

from __future__ import annotations

import logging
import os
from typing import Any

WORKER_DIED = "A worker died or was killed while executing a task"  # the raylet's notice, as it starts


def quiet_trial_failures() -> None:
    """Keep Ray's multi-line reports of a trial's failure off the console (see the module's docstring).

    Idempotent; call before `tune.Tuner(...).fit()` (Tune reads its variable when it starts).
    """
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    logging.getLogger("ray.tune.tune").addFilter(_NOT_INCOMPLETE)
    _drop_worker_death_notices()


class _DropIncompleteTrials(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Trials did not complete")


_NOT_INCOMPLETE = _DropIncompleteTrials()  # one instance: addFilter adds it once however often it is called


def _drop_worker_death_notices() -> None:
    """Wrap the function Ray's error listener prints the raylet's notices with, leaving out the
    worker-death notice. The listener looks the function up at each notice, so the wrapper takes
    effect whenever it is installed. A Ray without that function prints as before."""
    import ray._private.worker as ray_worker

    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "dlsearch_filtered", False):
        return

    def print_but_worker_deaths(data: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        if data.get("pid") == "raylet":
            lines = [line for line in data.get("lines", []) if not str(line).startswith(WORKER_DIED)]
            if not lines:
                return
            data = {**data, "lines": lines}
        printer(data, *args, **kwargs)

    print_but_worker_deaths.dlsearch_filtered = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_but_worker_deaths
