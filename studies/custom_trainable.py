"""A training function of your own, for studies/custom_trainable.yaml: a problem whose answer is known.

`fit(config, report)` stands in for a real training loop: each "epoch" it reports
a noisy loss that decays towards f(x, y), a bowl whose minimum f = 0 lies at
x = 1.5, y = -0.5. A search that works drives the best loss towards 0 and (x, y)
towards the optimum; pruning stops the trials whose curves stay high early.

The pieces every custom trainable uses (README, "Bring your own code"):

- `config` is the trial's configuration as a plain dict: `config["model"]["x"]` is
  this trial's sampled x; `config["train"]["epochs"]` the most epochs it may run;
  `config["seed"]` its seed.
- `report(epoch, metrics, checkpoint=...)` once per epoch; the study's objective
  (`loss`) must be among the metrics. If the pruner stops the trial, `report`
  raises: let it through.
- `report.last_checkpoint()` after a restart (Ray retries a trial whose worker
  died) gives back the last checkpoint, so the trial goes on from there.
- `report.log_artifact(path)` sends a file to the trial's MLflow run.
- The return value: final metrics, logged once the trial completes.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

OPTIMUM = (1.5, -0.5)  # where f is smallest: f(1.5, -0.5) = 0


def f(x: float, y: float) -> float:
    """The bowl the search should find the bottom of (steeper along y)."""
    return (x - OPTIMUM[0]) ** 2 + 10.0 * (y - OPTIMUM[1]) ** 2


def fit(config: dict[str, Any], report: Callable[..., None]) -> dict[str, float]:
    model, epochs = config["model"], config["train"]["epochs"]
    x, y, noise = model["x"], model["y"], model["noise"]
    target = f(x, y)

    state = report.last_checkpoint()  # None on a first run
    start = state["epoch"] + 1 if state else 1
    rng = random.Random(config["seed"])  # the trial's seed: a rerun draws the same noise
    if state:
        rng.setstate(state["rng"])

    curve = []
    for epoch in range(start, epochs + 1):
        # Like a training loss: far above its floor at first, then settling onto f(x, y).
        decay = math.exp(-0.5 * epoch)
        loss = target + 5.0 * decay + noise * decay * rng.gauss(0.0, 1.0)
        curve.append({"epoch": epoch, "loss": loss})
        report(epoch, {"loss": loss, "floor": target}, checkpoint={"epoch": epoch, "rng": rng.getstate()})

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "curve.json"
        path.write_text(json.dumps({"x": x, "y": y, "curve": curve}, indent=1))
        report.log_artifact(path)  # copied at once: the temporary folder may go
    return {"distance_to_optimum": math.dist((x, y), OPTIMUM)}
