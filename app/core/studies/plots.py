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

# The probes' plots (issue 12), each drawn where the study's base spec asks for its probe:
# plot name -> (the probe in JobSpec.diagnostics, [(PROBE_METRICS name, axis title), ...]).
PROBE_PLOTS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "landscape": (
        "landscape",
        [
            ("loss_variation", "loss variation"),
            ("gradient_predictiveness", "gradient predictiveness |g - g'|"),
            ("beta_smoothness", "effective beta-smoothness"),
            ("loss_variation_relative", "loss variation / loss"),
            ("gradient_predictiveness_relative", "|g - g'| / |g|"),
            ("beta_smoothness_relative", "beta-smoothness / |g|"),
        ],
    ),
    "covariate_shift": (
        "covariate_shift",
        [
            ("ics_l2_relative", "ICS |G - G'| / |G| (layers 2..)"),
            ("ics_cosine", "ICS cos(G, G') (layers 2..)"),
        ],
    ),
    "gradient_noise": (
        "gradient_noise",
        [
            ("gradient_noise_scale", "gradient noise scale B_simple"),
            ("grad_norm_var", "gradient norm variance over steps"),
        ],
    ),
}

DROPOUT_AXIS = "model.dropout.rate"
NORMALIZATION_AXIS = "model.normalization.type"


def available(grid: dict[str, list[Any]], base: dict[str, Any] | None = None) -> list[str]:
    """The plots a study with this grid (and base spec, whose probes add theirs) has."""
    names = ["learning_curves"]
    if _numeric_axis(grid, DROPOUT_AXIS):
        names.append("gap_by_dropout")
    if _numeric_axis(grid, LR_AXIS):
        names.append("accuracy_by_lr")
    names += [name for name, (probe, _) in PROBE_PLOTS.items() if _probed(probe, grid, base)]
    return names


def _probed(probe: str, grid: dict[str, list[Any]], base: dict[str, Any] | None) -> bool:
    """Whether some job of the study runs the probe: the base asks for it (`{}` too: the
    probe with its defaults), or an axis does (a field of it sets the whole section)."""
    if ((base or {}).get("diagnostics") or {}).get(probe) is not None:
        return True
    section = f"diagnostics.{probe}"
    for axis, values in grid.items():
        if axis.startswith(f"{section}."):
            return True
        if axis == section and any(value is not None for value in values):
            return True
        if axis == "diagnostics" and any(
            isinstance(value, dict) and value.get(probe) is not None for value in values
        ):
            return True
    return False


def _numeric_axis(grid: dict[str, list[Any]], axis: str) -> bool:
    """Whether the axis has two or more values to put on an x axis: numbers, not per-layer
    lists such as a dropout rate of [0.5, 0.2]."""
    values = grid.get(axis, [])
    return len(values) > 1 and all(
        isinstance(value, int | float) and not isinstance(value, bool) for value in values
    )


def _short(axis: str) -> str:
    """model.normalization.type -> normalization, optimizer.lr -> lr, seed -> seed."""
    parts = axis.split(".")
    return parts[-2] if len(parts) > 1 and parts[-1] in ("type", "rate") else parts[-1]


def _label(configuration: dict[str, Any]) -> str:
    label = ", ".join(f"{_short(axis)}={value}" for axis, value in configuration.items())
    # matplotlib reads text between two $ as mathtext: a grid's text value such as "$\\foo$"
    # raised while drawing. Escaped, a $ is drawn as itself.
    return (label or "all").replace("$", r"\$")


def _finished(runs: list[Run]) -> list[Run]:
    return [run for run in runs if run.status == "succeeded" and run.epochs.size]


def curve_over_seeds(
    runs: list[Run], metric: str
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """Epochs, mean and standard deviation over the runs that reached each epoch; `metric` is
    a Run field or a probe figure (report.PROBE_METRICS)."""
    last = max(int(run.epochs.max()) for run in runs)
    table = np.full((len(runs), last), np.nan)
    for row, run in enumerate(runs):
        if hasattr(run, metric):
            table[row, run.epochs - 1] = getattr(run, metric)
        elif metric in run.probes:
            table[row, run.epochs - 1] = run.probes[metric]
    counts = np.sum(np.isfinite(table), axis=0)
    keep = counts > 0
    means = np.nanmean(table[:, keep], axis=0)
    spread = np.nanstd(table[:, keep], axis=0)
    return np.arange(1, last + 1)[keep], means, spread


def _groups(
    grid: dict[str, list[Any]], runs: list[Run], drop: tuple[str, ...]
) -> list[tuple[dict[str, Any], list[Run]]]:
    others = {axis: values for axis, values in grid.items() if axis not in (*drop, SEED_AXIS)}
    # Each run's key once: matching every run against every configuration was quadratic
    # (seconds for a study of 1000 configurations, on each request for a plot).
    by_key: dict[str, list[Run]] = {}
    for run in _finished(runs):
        by_key.setdefault(point_key({a: run.grid_point.get(a) for a in others}), []).append(run)
    return [
        (configuration, by_key.get(point_key(configuration), []))
        for configuration in configurations_in_order(others)
    ]


def _figure(width: float = 10.0, height: float = 4.5) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# What an axes with nothing to draw says, so that an empty frame is not read as a broken plot
# (a study whose runs all failed, or one that has only just started).
NOTHING_YET = "no run has succeeded yet"


def _say_if_empty(axes: Any, why: str = NOTHING_YET) -> None:
    if not axes.lines and not axes.collections:
        axes.text(0.5, 0.5, why, transform=axes.transAxes, ha="center", va="center", color="0.4")


def _by_epoch(axes: Any, lines: int) -> None:
    """An epoch axis: whole epochs only, and enough distinct colours for `lines` lines
    (matplotlib's default cycle repeats after 10)."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if lines > 10:
        axes.set_prop_cycle(color=[colormaps["tab20"](i) for i in range(20)])


# A legend of more entries than this, or of longer labels, crowds out the plot it explains
# (a study may have 1000 configurations, a grid value 200 characters): it is cut, and drawn
# beside the plot, not over its lines.
LEGEND_ENTRIES = 12
LABEL_CHARS = 48
_INSIDE_ENTRIES, _INSIDE_CHARS = 6, 30
_OUTSIDE_INCHES = 3.5  # a legend of LABEL_CHARS-long labels, set small


def _legend(axes: Any, fontsize: str) -> None:
    """The axes' legend, if it has lines: the first LEGEND_ENTRIES, each label cut to
    LABEL_CHARS, a title that says how many there are when not all are shown, and outside
    the axes (to the figure's right) when it is long or wide."""
    handles, labels = axes.get_legend_handles_labels()
    if not handles:
        return
    shown = [
        label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"
        for label in labels[:LEGEND_ENTRIES]
    ]
    title = f"first {LEGEND_ENTRIES} of {len(labels)}" if len(labels) > LEGEND_ENTRIES else None
    options = {"fontsize": fontsize, "title": title, "title_fontsize": fontsize}
    if len(shown) <= _INSIDE_ENTRIES and max(map(len, shown)) <= _INSIDE_CHARS:
        axes.legend(handles[: len(shown)], shown, **options)
    else:
        figure = axes.figure
        figure.set_figwidth(figure.get_figwidth() + _OUTSIDE_INCHES)  # room: the plots keep theirs
        figure.legend(handles[: len(shown)], shown, loc="outside right upper", **options)


def _curve(axes: Any, epochs: Any, mean: Any, label: str) -> Any:
    # A one-epoch curve is a single point: without a marker it would not show at all.
    (line,) = axes.plot(epochs, mean, label=label, marker="o" if len(epochs) == 1 else None)
    return line


def learning_curves(grid: dict[str, list[Any]], runs: list[Run]) -> Any:
    figure = _figure()
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    groups = [(c, members) for c, members in _groups(grid, runs, ()) if members]
    for axes in (loss_axes, accuracy_axes):
        _by_epoch(axes, len(groups))
    for configuration, members in groups:
        label = _label(configuration_of(configuration))
        for axes, metric in ((loss_axes, "val_loss"), (accuracy_axes, "val_accuracy")):
            epochs, mean, spread = curve_over_seeds(members, metric)
            line = _curve(axes, epochs, mean, label)
            axes.fill_between(
                epochs, mean - spread, mean + spread, alpha=0.2, color=line.get_color()
            )
    loss_axes.set(xlabel="epoch", ylabel="validation loss", title="validation loss (mean ± sd)")
    accuracy_axes.set(
        xlabel="epoch", ylabel="validation accuracy", title="validation accuracy (mean ± sd)"
    )
    _legend(accuracy_axes, "small")
    _say_if_empty(loss_axes)
    _say_if_empty(accuracy_axes)
    return figure


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
) -> Any:
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
    _legend(axes, "small")
    _say_if_empty(axes)
    return figure


def probe_curves(name: str, grid: dict[str, list[Any]], runs: list[Run]) -> Any:
    """A probe's figures by epoch, one line per configuration (mean ± sd over seeds), as in
    Santurkar et al.'s figure 4; raw figures above, relative ones below for the landscape."""
    panels = PROBE_PLOTS[name][1]
    columns = min(len(panels), 3)
    rows = (len(panels) + columns - 1) // columns
    figure = _figure(4.2 * columns, 3.4 * rows)
    grid_axes = np.atleast_1d(figure.subplots(rows, columns)).reshape(-1)
    groups = _groups(grid, runs, ())
    for (metric, title), axes in zip(panels, grid_axes, strict=True):
        _by_epoch(axes, len(groups))
        for configuration, members in groups:
            measured = [run for run in members if metric in run.probes]
            if not measured:
                continue
            epochs, mean, spread = curve_over_seeds(measured, metric)
            line = _curve(axes, epochs, mean, _label(configuration_of(configuration)))
            axes.fill_between(
                epochs, mean - spread, mean + spread, alpha=0.2, color=line.get_color()
            )
        positive = [line.get_ydata() for line in axes.lines]
        if positive and all(np.nanmin(np.asarray(y, dtype=float)) > 0 for y in positive):
            axes.set_yscale("log")  # these figures span orders of magnitude across configurations
        axes.set(xlabel="epoch", title=title)
        _say_if_empty(axes, "no succeeded run has measured this yet")
    _legend(grid_axes[0], "x-small")
    return figure


def draw(name: str, grid: dict[str, list[Any]], runs: list[Run]) -> bytes:
    """The named plot as PNG bytes; the caller checks the name against available()."""
    return _png(figure_of(name, grid, runs))


def figure_of(name: str, grid: dict[str, list[Any]], runs: list[Run]) -> Any:
    """The named plot as a matplotlib Figure."""
    if name in PROBE_PLOTS:
        return probe_curves(name, grid, runs)
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
