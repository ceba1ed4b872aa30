"""The LCBench surrogate (YAHPO Gym 1.0.2's `lcbench` scenario) read with onnxruntime alone.

`../shared/data/lcbench/` holds the ONNX model of LCBench's learning curves (Zimmer et al., 2021;
34 OpenML tasks, an MLP space of 7 hyperparameters, epochs 1-52), its task encoding
(`encoding.json`) and its space (`config_space.json`). YAHPO Gym itself would pull ConfigSpace
0.6.1 and downgrade numpy, so this module does what its `BenchmarkSet.objective_function` does
with onnxruntime alone: the model takes `x_cat` (the task's code from `encoding.json`, int32,
shape (n, 1)) and `x_cont` (the raw values, no log or scaling, of `INPUTS` in that order,
float32, shape (n, 8)) and returns `OUTPUTS` in that order (shape (n, 6)); `time` is the
seconds spent up to that epoch, `val_accuracy` is in percent. tests/test_lcbench.py checks a
few values against YAHPO Gym's own.

- `Surrogate(folder).curves(task, configs, epochs)`: every config's curve in one batched call.
- `Surrogate.curve_of(task)`: a `curve_of` for `dlsearch.tuner.simulate.simulate_study`: a
  trial's curve, computed lazily in doubling chunks of epochs (a trial pruned at epoch 1 costs
  one row, one run to the end 52 rows in 6 calls).
- `Surrogate.reference(task)`: the best trial value of a large random sample (cached).
- `replay`: the study's `trainable` (the curve, reported epoch by epoch), so that an LCBench
  study file is a valid dlsearch study that also runs on Ray with `dlsearch run`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# The model's inputs and outputs, in its order (yahpo_gym/benchmarks/lcbench.py: cont_names, y_names).
INPUTS = ("epoch", "batch_size", "learning_rate", "momentum", "weight_decay", "num_layers", "max_units", "max_dropout")
OUTPUTS = ("time", "val_accuracy", "val_cross_entropy", "val_balanced_accuracy", "test_cross_entropy",
           "test_balanced_accuracy")
PARAMS = INPUTS[1:]  # the searched hyperparameters (the epoch is the fidelity)
N_EPOCHS = 52
METRIC = "val_accuracy"
# The surrogate's cumulative time goes down between epochs in about 0.3% of its rows (its noise);
# such an epoch takes this long, so that epochs stay in order on the simulated clock.
MIN_EPOCH_S = 0.01
# How many configurations the per-task reference samples, and its seed (fixed: the reference
# must not move between runs). 5,000 random MLPs trained 52 epochs is ~250x the budget of a study.
REFERENCE_SAMPLE = 5000
REFERENCE_SEED = 20230417
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dlsearch" / "lcbench"


@dataclass(frozen=True)
class Dim:
    """One hyperparameter of the space, as `config_space.json` gives it."""

    name: str
    low: float
    high: float
    log: bool
    integer: bool

    def study_entry(self) -> dict[str, Any]:
        """As a dlsearch search dimension."""
        if self.integer:
            return {"type": "int", "low": int(self.low), "high": int(self.high), "log": self.log}
        return {"type": "float", "low": float(self.low), "high": float(self.high), "log": self.log}


def data_folder() -> Path:
    """Where the surrogate's files are: $DLSEARCH_DATA_DIR/lcbench, else ../shared/data/lcbench."""
    root = os.environ.get("DLSEARCH_DATA_DIR")
    folder = Path(root) / "lcbench" if root else REPO.parent / "shared" / "data" / "lcbench"
    return folder if folder.is_dir() else REPO.parent / "shared" / "data" / "lcbench"


class Surrogate:
    """The surrogate model, its tasks (in the instance order) and its space."""

    def __init__(self, folder: str | Path | None = None, n_threads: int = 1):
        self.folder = Path(folder) if folder else data_folder()
        if not (self.folder / "model.onnx").is_file():
            raise FileNotFoundError(f"no LCBench surrogate in {self.folder} (model.onnx, encoding.json, "
                                    "config_space.json; see ../shared/data/lcbench/README.md)")
        space = json.loads((self.folder / "config_space.json").read_text())["hyperparameters"]
        by_name = {h["name"]: h for h in space}
        self.tasks: tuple[str, ...] = tuple(by_name["OpenML_task_id"]["choices"])  # YAHPO's instance order
        self.space: dict[str, Dim] = {
            name: Dim(name, by_name[name]["lower"], by_name[name]["upper"], bool(by_name[name]["log"]),
                      by_name[name]["type"] == "uniform_int")
            for name in PARAMS
        }
        self._codes: dict[str, int] = json.loads((self.folder / "encoding.json").read_text())["OpenML_task_id"]
        self._n_threads = n_threads
        self._session: Any = None  # opened at the first prediction (a process may fork before it)

    def predict(self, task: str, rows: np.ndarray) -> np.ndarray:
        """The model's outputs (n, 6) for `rows` (n, 8) of raw `INPUTS` values, on task `task`."""
        if task not in self._codes:
            raise KeyError(f"unknown LCBench task {task!r}; the tasks are {', '.join(self.tasks)}")
        if self._session is None:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            # One thread by default: the benchmark runs one study per core; threads would only contend.
            options.intra_op_num_threads = self._n_threads
            options.inter_op_num_threads = 1
            self._session = onnxruntime.InferenceSession(str(self.folder / "model.onnx"), options,
                                                         providers=["CPUExecutionProvider"])
        x_cat = np.full((len(rows), 1), self._codes[task], dtype=np.int32)
        return self._session.run(None, {"x_cat": x_cat, "x_cont": np.asarray(rows, dtype=np.float32)})[0]

    def curves(self, task: str, configs: Sequence[Mapping[str, float]],
               epochs: Sequence[int] = tuple(range(1, N_EPOCHS + 1))) -> dict[str, np.ndarray]:
        """Every config's outputs at `epochs`, in one batched call: {output: array (n configs, n epochs)}."""
        values = np.array([[float(c[p]) for p in PARAMS] for c in configs], dtype=np.float64).reshape(-1, len(PARAMS))
        ep = np.asarray(epochs, dtype=np.float64)
        rows = np.concatenate([np.repeat(ep[None, :, None], len(values), 0),
                               np.repeat(values[:, None, :], len(ep), 1)], axis=2).reshape(-1, len(INPUTS))
        out = self.predict(task, rows).reshape(len(values), len(ep), len(OUTPUTS))
        return {name: out[:, :, i].astype(np.float64) for i, name in enumerate(OUTPUTS)}

    def sample(self, n: int, rng: np.random.Generator) -> list[dict[str, float]]:
        """`n` configurations drawn uniformly from the space (log dimensions on a log scale)."""
        columns = {}
        for name, dim in self.space.items():
            if dim.log:
                x = np.exp(rng.uniform(math.log(dim.low), math.log(dim.high), n))
            else:
                x = rng.uniform(dim.low, dim.high + (1 if dim.integer else 0), n)
                x = np.floor(x) if dim.integer else x
            columns[name] = np.clip(np.round(x), dim.low, dim.high) if dim.integer else x
        return [{name: float(columns[name][i]) for name in self.space} for i in range(n)]

    def curve_of(self, task: str) -> "_CurveOf":
        """A `curve_of(params)` for `simulate_study` on task `task` (params by search key, any prefix)."""
        return _CurveOf(self, task)

    def reference(self, task: str, n: int = REFERENCE_SAMPLE) -> float:
        """The best trial value (its best epoch's val_accuracy, as dlsearch takes a trial's value)
        among `n` random configurations trained 52 epochs. Computed once per task and cached in
        ~/.cache/dlsearch/lcbench/ (keyed by the model file's size and mtime, `n` and the seed)."""
        stat = (self.folder / "model.onnx").stat()
        path = CACHE_DIR / f"reference-{stat.st_size}-{int(stat.st_mtime)}-{n}-{REFERENCE_SEED}.json"
        cached = json.loads(path.read_text()) if path.is_file() else {}
        if task not in cached:
            rng = np.random.default_rng([REFERENCE_SEED, int(task)])
            best = -math.inf
            for start in range(0, n, 500):  # 26,000 rows per call: memory stays small
                configs = self.sample(min(500, n - start), rng)
                best = max(best, float(self.curves(task, configs)[METRIC].max()))
            cached = json.loads(path.read_text()) if path.is_file() else {}  # another process may have added
            cached[task] = best
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cached, indent=1, sort_keys=True))
            tmp.replace(path)
        return float(cached[task])


class LazyCurve:
    """One trial's curve, computed when first needed in chunks that double (epochs 1, 2-3, 4-7, ...):
    a trial pruned early costs a few rows, one run to the end `N_EPOCHS` rows in about 6 calls."""

    def __init__(self, surrogate: Surrogate, task: str, config: Mapping[str, float], n_epochs: int = N_EPOCHS):
        self.n_epochs = n_epochs
        self._surrogate, self._task, self._config = surrogate, task, dict(config)
        self._metrics: list[dict[str, float]] = []
        self._times: list[float] = []  # cumulative seconds at each computed epoch
        self.n_rows = 0  # surrogate rows computed so far

    def at(self, epoch: int) -> tuple[dict[str, float], float]:
        """Epoch `epoch`'s metrics (val_accuracy in percent, the losses, ...) and its duration in seconds."""
        if not 1 <= epoch <= self.n_epochs:
            raise IndexError(f"`1 <= epoch <= {self.n_epochs}` must hold, but got (epoch={epoch})")
        while len(self._metrics) < epoch:
            first = len(self._metrics) + 1
            last = min(self.n_epochs, 2 * first - 1)
            out = self._surrogate.curves(self._task, [self._config], range(first, last + 1))
            self.n_rows += last - first + 1
            for i in range(last - first + 1):
                self._metrics.append({k: float(out[k][0, i]) for k in OUTPUTS if k != "time"})
                self._times.append(float(out["time"][0, i]))
        before = self._times[epoch - 2] if epoch > 1 else 0.0
        return self._metrics[epoch - 1], max(MIN_EPOCH_S, self._times[epoch - 1] - before)


class _CurveOf:
    """`curve_of(params)`: a trial's `LazyCurve` from its sampled values (search keys such as
    `model.learning_rate`: the part after the last dot names the LCBench hyperparameter)."""

    def __init__(self, surrogate: Surrogate, task: str):
        self.surrogate, self.task = surrogate, task
        self.curves: list[LazyCurve] = []

    def __call__(self, params: Mapping[str, Any]) -> LazyCurve:
        config = {key.rpartition(".")[2]: float(value) for key, value in params.items()}
        missing = [p for p in PARAMS if p not in config]
        if missing:
            raise KeyError(f"the trial sampled no {', '.join(missing)} (got {', '.join(params)})")
        curve = LazyCurve(self.surrogate, self.task, config)
        self.curves.append(curve)
        return curve

    @property
    def n_rows(self) -> int:
        return sum(c.n_rows for c in self.curves)


def study_dict(task: str, surrogate: Surrogate | None = None, *, name: str | None = None,
               seed: int = 0) -> dict[str, Any]:
    """An LCBench study as the dict of a study file: the 7 hyperparameters under `model.` (a
    custom model's own keys), val_accuracy maximized, 52 epochs, the study's default sampler and
    pruner. `trainable: bench.lcbench_surrogate:replay` replays the curve, so the study also
    runs on Ray (`dlsearch run`); `simulate_study` replays it on a simulated clock instead."""
    space = (surrogate or Surrogate()).space
    return {
        "name": name or f"lcbench-{task}",
        "seed": seed,
        "trainable": "bench.lcbench_surrogate:replay",
        "data": {"dataset": "custom", "task": task},  # the trainable reads data.task
        "model": {"kind": "custom"},
        "train": {"epochs": N_EPOCHS},
        "search": {f"model.{p}": space[p].study_entry() for p in PARAMS},
        "objective": {"metric": METRIC, "direction": "maximize"},
        "tracking": {"register_best": False},
    }


def replay(config: dict, report: Any) -> dict[str, float] | None:
    """The study's trainable: report the surrogate's curve of this trial, epoch by epoch.

    Epochs take no time here (no sleep): `epoch_time_s` is the surrogate's, so MLflow shows
    the recorded durations. Pruning raises out of `report`, as for any trainable.
    """
    task = str(config["data"]["task"])
    curve = LazyCurve(_shared_surrogate(), task, {p: config["model"][p] for p in PARAMS},
                      int(config["train"]["epochs"]))
    for epoch in range(1, curve.n_epochs + 1):
        metrics, seconds = curve.at(epoch)
        report(epoch, {**metrics, "epoch_time_s": seconds})
    return None


_SURROGATE: Surrogate | None = None


def _shared_surrogate() -> Surrogate:
    global _SURROGATE
    if _SURROGATE is None:
        _SURROGATE = Surrogate()
    return _SURROGATE
