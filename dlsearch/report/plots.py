"""A study's plots, as the PNG files a finished run logs to its MLflow parent run.

Drawn with plain matplotlib rather than `optuna.visualization.matplotlib`, each for a reason the
Optuna version falls short on (checked on the digits quickstart, 24 trials of which 13 pruned):
- optimization history: Optuna's shows complete trials only; here pruned trials appear too, at the
  last value they reported, with the best-so-far line of complete trials.
- parallel coordinates: Optuna's draws category labels over the next axis's ticks, the worst trials
  near-white on grey, integers as floats (1.00, 1.25, ...) and conditional params as a "None" value.
  Here each axis has its own scale (log, integer, categories), the colour runs from orange (worst) to
  dark blue (best) on white, and a conditional param's axis is crossed only by the trials that have it
  (W&B's parallel coordinates and optuna-dashboard are the model).
- importances: the same numbers as importances.json (computed once), with how many trials they rest on.

Only `learning_curves.png` is drawn for several objectives (the other three need one value per trial).
matplotlib is imported inside the functions: ~0.5 s, paid only by the end of a run and by tests.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from dlsearch.config.spec import StudySpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOTS = ("optimization_history.png", "param_importances.png", "learning_curves.png", "parallel_coordinates.png")
# Below this many complete trials, the importances plot says they are rough: with PED-ANOVA's default
# (the top 10% against all), 30 trials put 3 in the top set; one more trial can still reorder params.
ROUGH_IMPORTANCES_BELOW = 30
_STATE_COLORS = {"COMPLETE": "tab:blue", "PRUNED": "tab:orange", "FAIL": "tab:red"}
_DPI = 110
_MAX_EPOCH_LABELS = 60  # more pruned trials than this: their epoch labels would hide the points


def write_plots(spec: StudySpec, study: optuna.Study, out: Path, importances: Mapping[str, float],
                evaluator: str = "PED-ANOVA") -> list[Path]:
    """The plots of PLOTS that the study has enough trials for, as PNG files in `out`; returns them.

    `importances` are the numbers the run logs as importances.json (and `evaluator` their method):
    the plot shows those, not a second computation. A plot that cannot be drawn (no trial with a
    value yet) is left out rather than failing the end of the run.
    """
    single = len(study.directions) == 1
    makers: dict[str, Callable[[], Figure | None] | None] = {
        "optimization_history.png": (lambda: optimization_history(spec, study)) if single else None,
        "param_importances.png": (lambda: param_importances(spec, study, importances, evaluator))
        if single and importances else None,
        "learning_curves.png": lambda: learning_curves(spec, study),
        "parallel_coordinates.png": (lambda: parallel_coordinates(spec, study)) if single else None,
    }
    written = []
    out.mkdir(parents=True, exist_ok=True)
    for name, make in makers.items():
        if make is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. a tight layout that cannot fit a long title
                fig = make()
                if fig is None:
                    continue
                fig.savefig(out / name, dpi=_DPI, bbox_inches="tight")
            written.append(out / name)
        except (ValueError, RuntimeError, IndexError):
            continue  # a study too odd for this plot (it is not worth failing the run's end over)
    return written


def optimization_history(spec: StudySpec, study: optuna.Study) -> Figure | None:
    """Each trial's objective by trial number: complete trials as dots, pruned trials at the last value
    they reported (labelled with the epoch they stopped at), failed trials as ticks on the x axis; the
    best-so-far line follows complete trials only (a pruned trial's value is not a final one). None
    when no trial reported a value."""
    fig, ax = _figure(9, 5.2)
    metric = spec.objectives[0].metric
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials = study.get_trials(deepcopy=False)
    complete = [(t.number, t.value) for t in trials
                if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
    pruned = [(t.number, *last) for t in trials if t.state == TrialState.PRUNED and (last := _last_report(t))]
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    if not complete and not pruned:
        return None

    if complete:
        ax.scatter(*zip(*complete), s=30, color=_STATE_COLORS["COMPLETE"], zorder=4, label="complete")
    if pruned:
        labelled = len(pruned) <= _MAX_EPOCH_LABELS
        ax.scatter([n for n, _, _ in pruned], [v for _, _, v in pruned], marker="x", s=36, linewidths=1.5,
                   color=_STATE_COLORS["PRUNED"], zorder=3, label="pruned: its last reported value"
                   + (" (beside it: the epoch it stopped at)" if labelled else ""))
        for number, epoch, value in pruned if labelled else []:
            ax.annotate(str(epoch), (number, value), xytext=(4, -3), textcoords="offset points",
                        fontsize=7, color="#8a4a00")
    if complete:
        _draw_best_so_far(ax, complete, maximize, last=max(t.number for t in trials))
    if failed:
        # Failed trials have no value: ticks along the bottom edge, at their trial numbers.
        ax.scatter(failed, [0.0] * len(failed), marker="|", s=160, linewidths=2, color=_STATE_COLORS["FAIL"],
                   transform=ax.get_xaxis_transform(), clip_on=False, zorder=5, label="failed (no value)")
    values = [v for _, v in complete] + [v for _, _, v in pruned]
    if min(values) > 0 and max(values) / min(values) >= 100:
        ax.set_yscale("log")  # e.g. a loss objective where diverged trials report huge values
    _integer_ticks(ax.xaxis)
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"{study.study_name}: {metric} by trial ({_counts(trials)})", fontsize=11)
    # Below the axes: inside, any corner can hide a trial (pruned ones spread over the whole height).
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8, frameon=False)
    return fig


def param_importances(spec: StudySpec, study: optuna.Study, importances: Mapping[str, float],
                      evaluator: str = "PED-ANOVA") -> Figure | None:
    """`importances` as horizontal bars, largest on top, under a title naming how many complete trials
    they come from, and a caption saying what was left out and, with few trials, that they are rough.
    A conditional param's bar names the trials that have it (its importance rests on those only)."""
    if not importances:
        return None
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    ranked = sorted(importances.items(), key=lambda kv: kv[1])
    labels = []
    for name, _ in ranked:
        n_with = sum(name in t.params for t in complete)
        labels.append(name if n_with == len(complete) else f"{name}  (in {n_with} of {len(complete)})")
    fig, ax = _figure(8, 0.9 + 0.42 * len(ranked) + 0.9)
    bars = ax.barh(range(len(ranked)), [v for _, v in ranked], color="tab:blue", height=0.6)
    ax.bar_label(bars, labels=[f"{v:.2f}" if v >= 0.005 else "<0.01" for _, v in ranked], padding=3, fontsize=8)
    ax.set_yticks(range(len(ranked)), labels=labels)
    ax.set_xlim(0, max(1.0, max(v for _, v in ranked)) * 1.08)
    ax.set_xlabel("importance (shares sum to 1)")
    ax.grid(axis="y", visible=False)
    n_complete = len(complete)
    ax.set_title(f"{study.study_name}: parameter importances ({evaluator}) from {n_complete} complete trials",
                 fontsize=11)
    left_out = [f"{n} {'failed' if state == 'FAIL' else state.lower()}"
                for state, n in _state_counts(trials).items() if state != "COMPLETE" and n]
    caption = (f"Of {len(trials)} trials, only the {n_complete} complete ones have a final {spec.objectives[0].metric}"
               + (f" ({' and '.join(left_out)} left out)." if left_out else "."))
    if n_complete < ROUGH_IMPORTANCES_BELOW:
        caption += (f" With fewer than {ROUGH_IMPORTANCES_BELOW} complete trials, read these as rough: "
                    "one more trial can reorder them.")
    if any("(in " in label for label in labels):
        caption += " A conditional param's importance rests only on the trials that have it."
    fig.text(0.01, 0.0, "\n".join(textwrap.wrap(caption, 110)), fontsize=8, color="#444444", va="top")
    return fig


def learning_curves(spec: StudySpec, study: optuna.Study) -> Figure:
    """Every trial's first objective per epoch on one axis, coloured by how the trial ended; a cross
    where a pruned trial stopped; the best trial (single objective) in black."""
    fig, ax = _figure(9, 5.2)
    trials = study.get_trials(deepcopy=False)
    single = len(study.directions) == 1
    best = study.best_trial if single and _has_complete(study) else None
    for t in trials:
        steps = sorted(t.intermediate_values)
        values = [t.intermediate_values[s] for s in steps]
        if not steps or not all(math.isfinite(v) for v in values):
            continue
        is_best = best is not None and t.number == best.number
        color = "black" if is_best else _STATE_COLORS.get(t.state.name, "gray")
        ax.plot(steps, values, color=color, alpha=1.0 if is_best else 0.55, linewidth=2.2 if is_best else 1.0,
                zorder=3 if is_best else 2)
        if t.state == TrialState.PRUNED:
            ax.plot(steps[-1:], values[-1:], marker="x", color=color, markersize=5, alpha=0.9)
    present = _state_counts(trials)
    for state, color in _STATE_COLORS.items():
        if present[state]:
            ax.plot([], [], color=color, label={"FAIL": "failed"}.get(state, state.lower()))
    if best is not None:
        ax.plot([], [], color="black", linewidth=2.2, label=f"best (trial {best.number})")
    _integer_ticks(ax.xaxis)
    ax.set_xlabel("epoch")
    ax.set_ylabel(spec.objectives[0].metric)
    ax.set_title(f"{study.study_name}: learning curves ({_counts(trials)})", fontsize=11)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    return fig


def parallel_coordinates(spec: StudySpec, study: optuna.Study) -> Figure | None:
    """One vertical axis for the objective, then one per searched param, each in its own scale; one line
    per complete trial, coloured by its value (darker is better, the best drawn on top and thickest),
    and pruned trials as thin grey lines across the param axes only (they have no final value).

    Axes: the objective, then params present in every trial (in the study file's order), then
    conditional ones, labelled with their condition, so the line of a trial without one simply ends
    early. Log params get a log axis, int params integer ticks, categorical params one tick per choice.
    None when no complete trial has a finite value.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.lines import Line2D

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
    if not complete:
        return None
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.params]
    metric = spec.objectives[0].metric
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    axes = [_objective_axis(metric, [t.value for t in complete])] + _param_axes(spec, complete + pruned)

    fig, ax = _figure(max(8.0, 1.45 * len(axes) + 1.6), 5.6)
    ax.set_xlim(0, len(axes) - 1)
    ax.set_ylim(-0.03, 1.03)
    ax.set_yticks([])
    ax.grid(False)
    for side in ("left", "right", "bottom", "top"):
        ax.spines[side].set_visible(False)
    ax.set_xticks(range(len(axes)), labels=[a.title for a in axes], fontsize=9)
    ax.xaxis.tick_top()
    ax.tick_params(axis="x", length=0, pad=6)

    # Orange (worst) to dark blue (best): both ends readable on white, unlike Blues' near-white end.
    colors = colormaps["plasma"]([0.82 - 0.82 * i / 255 for i in range(256)])
    cmap = LinearSegmentedColormap.from_list("worst_to_best", colors)
    cmap = cmap if maximize else cmap.reversed()
    norm, clipped = _colour_range([t.value for t in complete], maximize)
    ranked = sorted(complete, key=lambda t: t.value if maximize else -t.value)  # worst first: best on top

    grey = [s for t in pruned for s in _segments(t, axes, with_objective=False)]
    ax.add_collection(LineCollection(grey, colors="#b8b8b8", linewidths=0.8, zorder=1, label="pruned"))
    *others, best = ranked
    lines = [(s, cmap(norm(t.value))) for t in others for s in _segments(t, axes, with_objective=True)]
    ax.add_collection(LineCollection([s for s, _ in lines], colors=[c for _, c in lines], linewidths=1.4,
                                     alpha=0.85, zorder=2, label="complete"))
    ax.add_collection(LineCollection(_segments(best, axes, with_objective=True), colors=[cmap(norm(best.value))],
                                     linewidths=2.8, zorder=3, label=f"best: trial {best.number}"))

    for i, axis in enumerate(axes):
        scale = ax.secondary_yaxis(i / (len(axes) - 1) if len(axes) > 1 else 0.0,
                                   functions=(axis.from_unit, axis.to_unit))
        scale.set_label(axis.name)
        scale.set_alignment("left" if i == 0 else "right")  # labels outside the first axis, then right of each
        scale.set_zorder(4)  # tick labels above the lines
        axis.style(scale.yaxis)
        scale.tick_params(labelsize=8, length=3)
        for tick in scale.yaxis.get_major_ticks(1):  # ticks made later copy the first one's label style
            tick.label1.set_path_effects(_halo())
            tick.label2.set_path_effects(_halo())

    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02, fraction=0.025, aspect=30,
                 extend=clipped, label=f"{metric} (darker is better)")
    handles = [Line2D([], [], color=cmap(norm(best.value)), linewidth=2.8,
                      label=f"best: trial {best.number}, {metric} {best.value:.4g}")]
    if pruned:
        handles.append(Line2D([], [], color="#b8b8b8", linewidth=1.2,
                              label=f"{len(pruned)} pruned trials: params only (no final {metric})"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.04), ncol=len(handles), fontsize=8,
              frameon=False)
    ax.set_title(f"{study.study_name}: parameters and {metric} of each trial ({_counts(trials)})",
                 fontsize=11, pad=34)
    return fig


@dataclass(frozen=True)
class _Axis:
    """One vertical axis of the parallel-coordinates plot: its name, its title (name, scale and any
    condition), and how a trial's value maps to the plot's unit height [0, 1] and back."""

    name: str
    title: str
    position: Callable[[FrozenTrial], float | None]  # the trial's place on the axis in [0, 1]; None: absent
    from_unit: Callable[[Any], Any]  # [0, 1] -> the axis's own values (numpy arrays in and out)
    to_unit: Callable[[Any], Any]
    style: Callable[[Any], None]  # sets the matplotlib YAxis's locator and formatter


def _objective_axis(metric: str, values: Sequence[float]) -> _Axis:
    from matplotlib.ticker import MaxNLocator

    low, high = min(values), max(values)
    span = high - low or max(abs(high) * 0.05, 1e-3)
    low, high = low - 0.02 * span, high + 0.02 * span

    def style(yaxis: Any) -> None:
        yaxis.set_major_locator(MaxNLocator(nbins=6))

    return _Axis(metric, f"{metric}\n(objective)",
                 position=lambda t: (t.value - low) / (high - low),
                 from_unit=lambda y: low + y * (high - low), to_unit=lambda v: (v - low) / (high - low),
                 style=style)


def _param_axes(spec: StudySpec, trials: Sequence[FrozenTrial]) -> list[_Axis]:
    """An axis per param the trials hold: those every trial has first, then conditional ones, each group in
    the study file's order (params the file does not name, e.g. a trainable's, after)."""
    distributions: dict[str, BaseDistribution] = {}
    for t in trials:
        for name, dist in t.distributions.items():
            distributions.setdefault(name, dist)
    order = {name: i for i, name in enumerate(spec.search)}
    names = sorted(distributions, key=lambda n: (any(n not in t.params for t in trials), order.get(n, len(order)), n))
    return [_param_axis(name, distributions[name], _condition(spec, name, trials)) for name in names]


def _param_axis(name: str, dist: BaseDistribution, condition: str) -> _Axis:
    import numpy as np
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatterSciNotation, LogLocator, MaxNLocator

    title = name + (f"\n{condition}" if condition else "")
    if isinstance(dist, CategoricalDistribution):
        choices = list(dist.choices)
        top = max(len(choices) - 1, 1)

        def categorical(yaxis: Any) -> None:
            yaxis.set_major_locator(FixedLocator(range(len(choices))))
            yaxis.set_major_formatter(FuncFormatter(lambda v, _: _choice_label(choices, v)))

        def place(t: FrozenTrial) -> float | None:
            value = t.params.get(name)
            return choices.index(value) / top if name in t.params and value in choices else None

        return _Axis(name, title, place, lambda y: np.asarray(y) * top, lambda i: np.asarray(i) / top, categorical)

    assert isinstance(dist, (FloatDistribution, IntDistribution)), f"{name}: unexpected {type(dist).__name__}"
    low, high = float(dist.low), float(dist.high)
    is_int = isinstance(dist, IntDistribution)
    if high <= low:
        high = low + 1.0  # a one-value range: any axis will do
    if dist.log:
        title += "\n(log)"
        ratio = math.log(high / low)

        def from_unit(y: Any) -> Any:
            return low * np.exp(np.asarray(y, dtype=float) * ratio)

        def to_unit(v: Any) -> Any:
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.log(np.asarray(v, dtype=float) / low) / ratio

        decades = math.log10(high / low)

        def log_axis(yaxis: Any) -> None:
            # Decades over a wide range (1e-4 ... 1e-1); 1-2-5 steps over a narrow one (16 ... 512).
            yaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if decades >= 2.5 else (1.0, 2.0, 5.0)))
            yaxis.set_minor_locator(FixedLocator([]))
            yaxis.set_major_formatter(LogFormatterSciNotation() if decades >= 2.5 and not is_int
                                      else FuncFormatter(lambda v, _: f"{v:g}"))

        style = log_axis
    else:
        def from_unit(y: Any) -> Any:
            return low + np.asarray(y, dtype=float) * (high - low)

        def to_unit(v: Any) -> Any:
            return (np.asarray(v, dtype=float) - low) / (high - low)

        def linear_axis(yaxis: Any) -> None:
            if is_int:
                step = int(getattr(dist, "step", 1) or 1)
                every = list(range(int(low), int(high) + 1, step))
                yaxis.set_major_locator(FixedLocator(every) if len(every) <= 10
                                        else MaxNLocator(nbins=6, integer=True))
                yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
            else:
                yaxis.set_major_locator(MaxNLocator(nbins=6))
                yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))

        style = linear_axis

    def place(t: FrozenTrial) -> float | None:
        return float(to_unit(t.params[name])) if name in t.params else None

    return _Axis(name, title, place, from_unit, to_unit, style)


def _colour_range(values: Sequence[float], maximize: bool) -> tuple[Any, str]:
    """The colour scale's range, and which end of it is clipped ("min", "max" or "neither").

    The scale spans the values unless a few trials lie far from the rest (a diverged trial at 0.1 when
    the others reach 0.95-0.98): then it stops at 4 times the best's distance to the median, so the
    good trials (what one reads this plot for) get distinct colours; the outliers take the worst colour
    and the objective axis still shows their value.
    """
    import statistics

    from matplotlib.colors import Normalize

    low, high = min(values), max(values)
    best = high if maximize else low
    reach = 4 * abs(best - statistics.median(values))
    clipped = "neither"
    if reach > 0 and maximize and best - reach > low:
        low, clipped = best - reach, "min"
    elif reach > 0 and not maximize and best + reach < high:
        high, clipped = best + reach, "max"
    return Normalize(low, high if high > low else low + 1e-12, clip=True), clipped


def _segments(t: FrozenTrial, axes: Sequence[_Axis], with_objective: bool) -> list[list[tuple[float, float]]]:
    """The trial's line as segments between neighbouring axes that both hold it: no line is drawn to an
    axis whose param the trial does not have (a conditional param whose condition did not hold)."""
    points = [None if i == 0 and not with_objective else a.position(t) for i, a in enumerate(axes)]
    return [[(i, points[i]), (i + 1, points[i + 1])] for i in range(len(points) - 1)
            if points[i] is not None and points[i + 1] is not None]


def _condition(spec: StudySpec, name: str, trials: Sequence[FrozenTrial]) -> str:
    """`only if a = x` for a conditional dimension of the study file; `in n of m trials` for a param that
    only some trials hold without a condition the file states; else empty."""
    dim = spec.search.get(name)
    if dim is not None and dim.when:
        parts = [f"{path} in {', '.join(map(str, want))}" if isinstance(want, list) else f"{path} = {want}"
                 for path, want in dim.when.items()]
        return "only if " + "\n".join(parts)
    holding = sum(name in t.params for t in trials)
    return f"in {holding} of {len(trials)} trials" if holding < len(trials) else ""


def _choice_label(choices: Sequence[Any], position: float) -> str:
    index = math.floor(position + 0.5)
    return str(choices[index]) if 0 <= index < len(choices) and abs(position - index) < 1e-6 else ""


def _last_report(t: FrozenTrial) -> tuple[int, float] | None:
    """The last epoch a trial reported and its value, if finite."""
    if not t.intermediate_values:
        return None
    epoch = max(t.intermediate_values)
    value = t.intermediate_values[epoch]
    return (epoch, value) if math.isfinite(value) else None


def _draw_best_so_far(ax: Any, complete: Sequence[tuple[int, float]], maximize: bool, last: int) -> None:
    """The best value of complete trials up to each trial number, as a step line to trial `last`, and the
    best trial as a star."""
    numbers, best_so_far = [], []
    for number, value in complete:
        numbers.append(number)
        best_so_far.append(value if not best_so_far else (max if maximize else min)(best_so_far[-1], value))
    ax.step(numbers + [last], best_so_far + best_so_far[-1:], where="post", color="black", linewidth=1.3,
            zorder=2, label="best so far (complete trials)")
    best = max(complete, key=lambda c: c[1] if maximize else -c[1])
    ax.scatter([best[0]], [best[1]], marker="*", s=220, color="gold", edgecolors="black", linewidths=0.8,
               zorder=5, label=f"best: trial {best[0]}, {best[1]:.4g}")


def _state_counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    for t in trials:
        if t.state.name in counts:
            counts[t.state.name] += 1
    return counts


def _counts(trials: Sequence[FrozenTrial]) -> str:
    """`24 trials: 11 complete, 13 pruned, 0 failed`."""
    counts = _state_counts(trials)
    return (f"{len(trials)} trials: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, "
            f"{counts['FAIL']} failed")


def _has_complete(study: optuna.Study) -> bool:
    return any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def _integer_ticks(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _halo() -> list[Any]:
    from matplotlib import patheffects

    return [patheffects.withStroke(linewidth=3, foreground="white")]


def _figure(width_in: float, height_in: float) -> tuple[Figure, Any]:
    """A figure on matplotlib's object API (no pyplot: no global figure to close, no GUI backend) with one
    axes on a white background and a light grid."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, color="#e4e4e4", linewidth=0.8)
    ax.set_axisbelow(True)
    return fig, ax
