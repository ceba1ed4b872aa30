"""What runs inside a Ray Tune trial: the built-in loop (or the user's), reporting through Tune.

The trial only reports; it knows nothing of Optuna or MLflow (the driver does
those writes, fed by these reports). Each epoch's metrics go out through
`ray.tune.report`, with a checkpoint every `train.checkpoint_every` epochs so a
crashed worker resumes where it was. A last report, marked `dlsearch_final`,
carries how the trial ended, its test metrics and, in its checkpoint, the model
(`model/best.pt`: the best weights; `model/last.pt`: a custom trainable's last
checkpoint) for the driver to log.

Files a custom trainable logs (`report.log_artifact`) travel the same way: they
are copied into every checkpoint written after them (under `artifacts/`), so the
driver finds them in the trial's last checkpoint however the trial ended, and a
restarted trial gets them back. Tune stores checkpoints where the driver can read
them: SQLite and MLflow keep a single writer.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

import ray
import torch
from ray import tune

from dlsearch.config.entrypoints import add_search_paths
from dlsearch.config.spec import StudySpec
from dlsearch.config.trial_config import trial_config
from dlsearch.errors import DlsearchError
from dlsearch.protocol import (
    ARTIFACTS_DIR,
    BEST_FILE,
    LAST_FILE,
    MEMBERS_DIR,
    MODEL_DIR,
    STATE_FILE,
    Assignment,
    EpochReport,
    PopulationEnd,
    PopulationEpoch,
    RoundAnswer,
    TrialEnd,
    to_result,
)
from dlsearch.trial.custom_trainable import run_custom_trainable
from dlsearch.trial.data import load_data
from dlsearch.trial.population import Population
from dlsearch.trial.train import train_trial


def run_trial(config: Mapping[str, Any], spec: StudySpec, code_paths: Sequence[str] = ()) -> None:
    """The Tune function trainable. `config` is what the driver's searcher suggested.

    `code_paths` are the driver's folders for user code (the study's folder, its working
    directory); the worker looks there first for the study's entry points.
    """
    add_search_paths(code_paths)
    # As many torch threads as CPUs the trial reserved: concurrent trials whose threads outnumber
    # the cores spend their time waiting for each other (worst for small sequence-model ops).
    assignment = Assignment.from_config(config)
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_trial * assignment.resources_scale)))
    place = _place()
    if assignment.is_population:
        _run_population(assignment, spec, place)
        return
    member = assignment.members[0]
    cfg = trial_config(spec, member.params, member.number)
    reporter = _TuneReporter(place)
    try:
        resume = reporter.restore()
        try:
            if cfg.model.init_from is not None:
                from dlsearch.tracking.tracker import with_local_source  # MLflow, imported only by transfer studies

                cfg = with_local_source(cfg, spec.tracking.uri)
            if cfg.trainable:
                result = run_custom_trainable(cfg, reporter, resume=resume, on_artifact=reporter.add_artifact)
            else:
                data = load_data(cfg.data, cfg.data_seed, base_dir=cfg.base_dir)  # cached per worker
                result = train_trial(cfg, data, reporter, resume=resume)
        except Exception as err:  # noqa: BLE001 - any error ends this trial as FAIL; the study goes on
            # An exception of the user's own code (a trainable, a model or data factory) keeps its
            # traceback, in the worker's log and in the trial's MLflow run; dlsearch's own errors (a
            # broken `report` contract, a setting the loop refuses) are their one line.
            own_code = cfg.trainable or cfg.model.kind == "custom" or cfg.data.dataset == "custom"
            where = traceback.format_exc() if own_code and not isinstance(err, DlsearchError) else ""
            if where:
                print(f"trial {member.number} failed:\n{where}", file=sys.stderr, flush=True)
            reporter.final(TrialEnd.failed(_one_line(err), _out_of_memory(err), where))
            return
        complete = result.state == "COMPLETE"
        reporter.final(
            TrialEnd.of(result),
            model={BEST_FILE: result.best_state, LAST_FILE: result.final_checkpoint} if complete else {},
        )
    finally:
        reporter.close()  # also when Tune stops a pruned trial (a SystemExit out of tune.report)


def warm_up() -> None:
    """A Ray task that runs it has imported this module, so its worker process holds torch and the
    training loop when Tune creates a trial's actor in it (see `tuner.runner._warm_workers`). It also
    makes one torch optimizer: the first one imports torch._dynamo (about 2 s on one core), which
    every trial's first epoch would otherwise wait for."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def _run_population(assignment: Assignment, spec: StudySpec, place: Mapping[str, str]) -> None:
    """A Tune trial carrying several Optuna trials: trained as one stacked model (`population.Population`).

    Each round goes out as ONE report (`PopulationEpoch`) holding every member's metrics at its
    own epoch and the members that ended in it; the driver answers through the study's
    `PruneBoard`, keyed by this population's id: the members to stop, and newly asked trials
    that join at their epoch 1 in the free slots, until the study's budget is asked.

    Every `train.checkpoint_every` rounds, and in every round where a member completed, the
    report carries a checkpoint: `state.pt` (the population as it stood after its last saved
    round) and `members/<number>/model/best.pt` of the members that completed in the round.
    A worker restarted from it (Tune's retries, `resources.max_failures`) resumes every member
    where it was, takes the answers of the rounds it repeats from the board (they stay there)
    and the driver skips the epochs it already has.
    """
    board = ray.get_actor(assignment.board)
    key = assignment.population
    numbers: dict[int, int] = {}  # population index -> trial number
    population: Population | None = None
    folder = Path(tempfile.mkdtemp(prefix="dlsearch-population-"))
    state_file = folder / STATE_FILE

    def apply(answer: RoundAnswer) -> None:
        assert population is not None
        by_number = {n: i for i, n in numbers.items()}
        population.stop([by_number[n] for n in answer.stop if n in by_number])
        newcomers = [trial_config(spec, m.params, m.number) for m in answer.add]
        for i, m in zip(population.add(newcomers), answer.add):
            numbers[i] = m.number

    try:
        resume = _population_state(state_file)
        first = trial_config(spec, assignment.members[0].params, assignment.members[0].number)
        every = first.train.checkpoint_every
        data = load_data(first.data, first.data_seed, base_dir=first.base_dir)  # cached per worker
        if resume is not None:
            population = Population.restore(resume["population"], data)
            numbers.update(resume["numbers"])
            if population.round:
                apply(ray.get(board.wait.remote(key, population.round)))
        else:
            population = Population([trial_config(spec, m.params, m.number) for m in assignment.members], data)
            numbers.update({i: m.number for i, m in enumerate(assignment.members)})
        while population.training:
            round_ = population.run_round()
            completed = {i: r for i, r in round_.ended.items() if r.state == "COMPLETE" and r.best_state is not None}
            save_state = round_.index % every == 0
            report = PopulationEpoch(
                round_.index,
                {numbers[i]: dict(m) for i, m in round_.metrics.items()},
                {numbers[i]: e for i, e in round_.epochs.items()},
                {numbers[i]: TrialEnd.of(r) for i, r in round_.ended.items()},
                checkpointed=save_state or bool(completed),
            )
            if save_state:
                tmp = state_file.with_suffix(".tmp")
                torch.save({"population": round_.state(), "numbers": dict(numbers)}, tmp)
                os.replace(tmp, state_file)  # a new file: an earlier checkpoint's hard link keeps its content
            if report.checkpointed:
                with tempfile.TemporaryDirectory() as tmp_dir:
                    _stage_population(Path(tmp_dir), state_file, {numbers[i]: r for i, r in completed.items()})
                    tune.report(to_result(report, place), checkpoint=tune.Checkpoint.from_directory(tmp_dir))
            else:
                tune.report(to_result(report, place))
            population.release(round_.ended)
            for i in round_.ended:
                numbers.pop(i, None)
            apply(ray.get(board.wait.remote(key, round_.index)))
    except Exception as err:  # noqa: BLE001 - the members still training end as FAIL; the study goes on
        end = TrialEnd.failed(_one_line(err), _out_of_memory(err))
        if population is None:
            training = {m.number for m in assignment.members} | set(numbers.values())
        else:
            training = {numbers[i] for i in population.rows if i in numbers}
        tune.report(to_result(PopulationEnd({n: end for n in training}), place))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _population_state(state_file: Path) -> dict | None:
    """The population state of this Tune trial's last checkpoint (a restarted worker), copied to `state_file`."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = Path(folder) / STATE_FILE
        if not path.exists():
            return None
        shutil.copyfile(path, state_file)
    # Our own file, written by this trial: full unpickling is safe here.
    return torch.load(state_file, weights_only=False)


def _stage_population(folder: Path, state_file: Path, completed: Mapping[int, Any]) -> None:
    """A population checkpoint: the last saved state (hard-linked, no copy) and the best weights of
    the members that completed in this round."""
    if state_file.exists():
        try:
            os.link(state_file, folder / STATE_FILE)
        except OSError:
            shutil.copyfile(state_file, folder / STATE_FILE)
    for number, result in completed.items():
        model = folder / MEMBERS_DIR / str(number) / MODEL_DIR
        model.mkdir(parents=True)
        torch.save(result.best_state, model / BEST_FILE)


def _place() -> dict[str, str]:
    """Where this trial runs: its Ray node, the GPUs Ray gave it and its share of them; and the
    memory cap it sets. A trial on a fraction of a GPU may allocate at most that fraction of its
    memory: one trial that grows cannot take the memory of the others sharing the GPU (it runs out
    of memory itself, and the driver runs it again with a larger share). The cap is reported (tag
    `dlsearch.gpu_memory_fraction`) whether or not CUDA is there to apply it."""
    context = ray.get_runtime_context()
    share = float(context.get_assigned_resources().get("GPU", 0.0))
    place = {"node_id": context.get_node_id()}
    if share > 0:
        place.update(gpu_ids=",".join(str(i) for i in ray.get_gpu_ids()), gpu_share=f"{share:g}")
    if 0 < share < 1:
        place["gpu_memory_fraction"] = f"{share:g}"
        if torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(share)
    return place


def _one_line(err: BaseException) -> str:
    """`Type: message`, the last line of the exception's own summary."""
    return traceback.format_exception_only(type(err), err)[-1].strip()


def _out_of_memory(err: BaseException) -> bool:
    """Whether `err` says the trial ran out of (GPU or host) memory."""
    text = str(err).lower()
    oom = (isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError))
           or any(s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory")))
    if oom and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the worker is reused: give the cache back to the GPU's other trials
    return oom


class _TuneReporter:
    """The report callable of a trial under Tune: epochs to the driver, checkpoints to Tune's storage."""

    def __init__(self, place: Mapping[str, str]) -> None:
        self._place = dict(place)  # the Ray node and GPUs (Tune adds hostname and node_ip to each result)
        self._folder = Path(tempfile.mkdtemp(prefix="dlsearch-trial-"))
        self._state = self._folder / STATE_FILE  # the last resume state, carried into later checkpoints
        self._artifacts = self._folder / ARTIFACTS_DIR
        self._new_artifacts = False

    def __call__(self, epoch: int, metrics: Mapping[str, float], checkpoint: dict | None = None) -> None:
        row = to_result(EpochReport(epoch, dict(metrics)), self._place)
        if checkpoint is not None:
            tmp = self._state.with_suffix(".tmp")
            torch.save(checkpoint, tmp)
            os.replace(tmp, self._state)  # a new file: an earlier checkpoint's hard link keeps its content
        if checkpoint is None and not self._new_artifacts:
            tune.report(row)
            return
        self._new_artifacts = False
        with tempfile.TemporaryDirectory() as tmp:
            self._stage(Path(tmp))
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(tmp))  # copied to storage before return

    def add_artifact(self, path: Path) -> None:
        """Copy a file or folder the trainable logged; it goes out with the next report."""
        self._artifacts.mkdir(exist_ok=True)
        target = self._artifacts / path.name
        if target.is_dir():
            shutil.rmtree(target)
        if path.is_dir():
            shutil.copytree(path, target)
        else:
            shutil.copyfile(path, target)
        self._new_artifacts = True

    def restore(self) -> dict | None:
        """The last checkpoint of this trial, when Ray restarted it after its worker died."""
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            if (Path(folder) / ARTIFACTS_DIR).is_dir():
                shutil.copytree(Path(folder) / ARTIFACTS_DIR, self._artifacts, dirs_exist_ok=True)
            path = Path(folder) / STATE_FILE
            if not path.exists():
                return None
            shutil.copyfile(path, self._state)
        # Our own file, written by this trial: full unpickling is safe here.
        return torch.load(self._state, weights_only=False)

    def final(self, end: TrialEnd, model: Mapping[str, Any] | None = None) -> None:
        """The trial's last report; its checkpoint holds the model files and every logged artifact."""
        result = to_result(end, self._place)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            for name, obj in (model or {}).items():
                if obj is not None:
                    (folder / MODEL_DIR).mkdir(exist_ok=True)
                    torch.save(obj, folder / MODEL_DIR / name)
            if self._artifacts.is_dir():
                shutil.copytree(self._artifacts, folder / ARTIFACTS_DIR)
            if any(folder.iterdir()):
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(tmp))
            else:
                tune.report(result)

    def close(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)

    def _stage(self, folder: Path) -> None:
        if self._state.exists():
            try:
                os.link(self._state, folder / STATE_FILE)  # no copy of a model-sized file
            except OSError:
                shutil.copyfile(self._state, folder / STATE_FILE)
        if self._artifacts.is_dir():
            shutil.copytree(self._artifacts, folder / ARTIFACTS_DIR)
