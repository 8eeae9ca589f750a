"""A study's plots as PNG bytes, drawn with matplotlib's object API on the Agg canvas.

No pyplot: no global figure state, safe in the API's threads. matplotlib is imported when a
plot is drawn, not when the API starts.
"""

import io
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app.core.studies.grid import SEED_AXIS, configuration_of, point_key
from app.core.studies.report import LR_AXIS, Run, configurations_in_order

DROPOUT_AXIS = "model.dropout.rate"
NORMALIZATION_AXIS = "model.normalization.type"


def available(grid: dict[str, list[Any]]) -> list[str]:
    """The plots a study with this grid has."""
    names = ["learning_curves"]
    if len(grid.get(DROPOUT_AXIS, [])) > 1:
        names.append("gap_by_dropout")
    if len(grid.get(LR_AXIS, [])) > 1:
        names.append("accuracy_by_lr")
    return names


def _short(axis: str) -> str:
    """model.normalization.type -> normalization, optimizer.lr -> lr, seed -> seed."""
    parts = axis.split(".")
    return parts[-2] if len(parts) > 1 and parts[-1] in ("type", "rate") else parts[-1]


def _label(configuration: dict[str, Any]) -> str:
    return ", ".join(f"{_short(axis)}={value}" for axis, value in configuration.items()) or "all"


def _finished(runs: list[Run]) -> list[Run]:
    return [run for run in runs if run.status == "succeeded" and run.epochs.size]


def curve_over_seeds(
    runs: list[Run], metric: str
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """Epochs, mean and standard deviation over the runs that reached each epoch."""
    last = max(int(run.epochs.max()) for run in runs)
    table = np.full((len(runs), last), np.nan)
    for row, run in enumerate(runs):
        table[row, run.epochs - 1] = getattr(run, metric)
    counts = np.sum(np.isfinite(table), axis=0)
    keep = counts > 0
    means = np.nanmean(table[:, keep], axis=0)
    spread = np.nanstd(table[:, keep], axis=0)
    return np.arange(1, last + 1)[keep], means, spread


def _groups(
    grid: dict[str, list[Any]], runs: list[Run], drop: tuple[str, ...]
) -> list[tuple[dict[str, Any], list[Run]]]:
    others = {axis: values for axis, values in grid.items() if axis not in (*drop, SEED_AXIS)}
    found = []
    for configuration in configurations_in_order(others):
        members = [
            run
            for run in _finished(runs)
            if point_key({a: run.grid_point.get(a) for a in others}) == point_key(configuration)
        ]
        found.append((configuration, members))
    return found


def _figure(width: float = 10.0, height: float = 4.5) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def learning_curves(grid: dict[str, list[Any]], runs: list[Run]) -> bytes:
    figure = _figure()
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for configuration, members in _groups(grid, runs, ()):
        if not members:
            continue
        label = _label(configuration_of(configuration))
        for axes, metric in ((loss_axes, "val_loss"), (accuracy_axes, "val_accuracy")):
            epochs, mean, spread = curve_over_seeds(members, metric)
            (line,) = axes.plot(epochs, mean, label=label)
            axes.fill_between(
                epochs, mean - spread, mean + spread, alpha=0.2, color=line.get_color()
            )
    loss_axes.set(xlabel="epoch", ylabel="validation loss", title="validation loss (mean ± sd)")
    accuracy_axes.set(
        xlabel="epoch", ylabel="validation accuracy", title="validation accuracy (mean ± sd)"
    )
    if accuracy_axes.lines:
        accuracy_axes.legend(fontsize="small")
    return _png(figure)


def _final(members: list[Run], metric: str) -> tuple[float, float] | None:
    values = np.array([getattr(run, metric)[-1] for run in members], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    return float(values.mean()), float(values.std())


def _by_axis(
    grid: dict[str, list[Any]],
    runs: list[Run],
    axis: str,
    metric: str,
    ylabel: str,
    title: str,
    log_x: bool,
) -> bytes:
    figure = _figure(7.0, 4.5)
    axes = figure.subplots()
    for configuration, members in _groups(grid, runs, (axis,)):
        xs, means, spreads = [], [], []
        for value in grid[axis]:
            at = [
                run
                for run in members
                if point_key({"v": run.grid_point.get(axis)}) == point_key({"v": value})
            ]
            final = _final(at, metric) if at else None
            if final is not None:
                xs.append(float(value))
                means.append(final[0])
                spreads.append(final[1])
        if xs:
            axes.errorbar(
                xs, means, yerr=spreads, marker="o", capsize=3, label=_label(configuration)
            )
    if log_x:
        axes.set_xscale("log")
    axes.set(xlabel=axis, ylabel=ylabel, title=title)
    if axes.lines:
        axes.legend(fontsize="small")
    return _png(figure)


def draw(name: str, grid: dict[str, list[Any]], runs: list[Run]) -> bytes:
    """The named plot as PNG bytes; the caller checks the name against available()."""
    if name == "gap_by_dropout":
        return _by_axis(
            grid,
            runs,
            DROPOUT_AXIS,
            "gap",
            "final generalization gap",
            "generalization gap by dropout rate (mean ± sd over seeds)",
            False,
        )
    if name == "accuracy_by_lr":
        return _by_axis(
            grid,
            runs,
            LR_AXIS,
            "val_accuracy",
            "final validation accuracy",
            "final accuracy by learning rate (mean ± sd over seeds)",
            True,
        )
    return learning_curves(grid, runs)
