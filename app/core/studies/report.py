"""A study's report, assembled from its runs' stored metrics: configurations, the largest
stable learning rate and the paired effects of each axis value against its baseline.

Plain data in, plain data out: the caller loads every run's metrics once (two queries for
the whole study), and this module never touches the database.
"""

import itertools
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app.core.studies import statistics
from app.core.studies.grid import SEED_AXIS, configuration_of, point_key

LR_AXIS = "optimizer.lr"
# "Above chance by a margin": a learning rate is stable if every seed ends this far above
# 1/num_classes in validation accuracy, and none diverged.
CHANCE_MARGIN = 0.1
# The default target: this fraction of the best configuration's mean best accuracy.
DEFAULT_TARGET_FRACTION = 0.95
ENDED = ("succeeded", "failed", "cancelled")
# The probes' per-epoch figures a report aggregates (issue 12, JobSpec.diagnostics): a name for
# the report, and the path to the figure in an epoch's stored diagnostics.
PROBE_METRICS: dict[str, tuple[str, str]] = {
    "loss_variation": ("landscape", "loss_variation_mean"),
    "loss_variation_relative": ("landscape", "loss_variation_relative_mean"),
    "gradient_predictiveness": ("landscape", "gradient_predictiveness_mean"),
    "gradient_predictiveness_relative": ("landscape", "gradient_predictiveness_relative_mean"),
    "beta_smoothness": ("landscape", "beta_smoothness_mean"),
    "beta_smoothness_relative": ("landscape", "beta_smoothness_relative_mean"),
    "ics_l2_relative": ("covariate_shift", "ics_l2_relative_mean"),
    "ics_cosine": ("covariate_shift", "ics_cosine_mean"),
    "gradient_noise_scale": ("gradient_noise", "gradient_noise_scale"),
    "grad_norm_var": ("gradient_noise", "grad_norm_var"),
}


@dataclass
class Run:
    """One job of the study with its per-epoch metrics (arrays ordered by epoch)."""

    job_id: uuid.UUID
    status: str
    grid_point: dict[str, Any]
    error_type: str | None
    num_classes: int | None
    epochs: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    val_loss: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    val_accuracy: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    gap: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    step_loss_std: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    epoch_seconds: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    # PROBE_METRICS name -> per-epoch values (NaN where an epoch has none); empty without probes
    probes: dict[str, NDArray[np.float64]] = field(default_factory=dict)
    # The pack its latest attempt trained in (worker/packing.py); None: alone.
    pack: uuid.UUID | None = None

    @property
    def diverged(self) -> bool:
        return self.status == "failed" and self.error_type == "diverged"

    def summary(self) -> statistics.RunSummary | None:
        if self.status != "succeeded":
            return None
        return statistics.summarize_run(
            self.epochs,
            self.val_loss,
            self.val_accuracy,
            self.gap,
            self.step_loss_std,
            self.epoch_seconds,
        )


def baseline_of(axis: str, values: list[Any]) -> Any:
    """The value others are compared with: no normalization, no dropout, else the first."""
    if axis.endswith("normalization.type") and "none" in values:
        return "none"
    if axis.endswith("dropout.rate"):
        for value in values:
            if value == 0:
                return value
    return values[0]


def label_of(axis: str, value: Any) -> str:
    """How a reading names an axis value: 'batch_norm', 'dropout 0.5', 'lr 0.1'."""
    if axis.endswith("normalization.type"):
        return str(value)
    if axis.endswith("dropout.rate"):
        return f"dropout {value}"
    if axis == LR_AXIS:
        return f"lr {value}"
    return f"{axis}={value}"


def configurations_in_order(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    axes = [axis for axis in grid if axis != SEED_AXIS]
    return [
        dict(zip(axes, values, strict=True))
        for values in itertools.product(*(grid[axis] for axis in axes))
    ]


def _aggregate(values: list[float | None] | list[float]) -> dict[str, Any]:
    return asdict(statistics.aggregate(values))


def _pending_note(counts: dict[str, int]) -> str | None:
    queued, running = counts.get("queued", 0), counts.get("running", 0)
    if not queued and not running:
        return None
    ended = sum(counts.get(status, 0) for status in ENDED)
    return (
        f"{queued} jobs still queued and {running} running; "
        f"this report covers the {ended} that ended"
    )


def _seconds_note(runs: list[Run], summaries: dict[uuid.UUID, Any]) -> str | None:
    """A packed job's epoch_seconds is its pack's epoch, every job of the pack at once: its
    seconds per epoch measure the pack, not the configuration, so the report says so."""
    done = [run for run in runs if summaries[run.job_id] is not None]
    packed = sum(run.pack is not None for run in done)
    if not packed:
        return None
    return (
        f"{packed} of the {len(done)} succeeded jobs trained in packs (several jobs as one "
        "batched model), and a packed job's seconds per epoch are its pack's: compare "
        "seconds_per_epoch only between configurations that trained alike, or time them with "
        "TRAINSVC_MAX_PACK=1"
    )


def build_report(
    grid: dict[str, list[Any]],
    runs: list[Run],
    target: float | None = None,
) -> dict[str, Any]:
    """The report's body (without identity or plot links, which the caller adds)."""
    counts = {status: 0 for status in ("queued", "running", *ENDED)}
    for run in runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    summaries = {run.job_id: run.summary() for run in runs}
    by_configuration: dict[str, list[Run]] = {}
    for run in runs:
        by_configuration.setdefault(point_key(configuration_of(run.grid_point)), []).append(run)

    configurations = configurations_in_order(grid)
    best_means = []
    for configuration in configurations:
        members = by_configuration.get(point_key(configuration), [])
        best = [s.best_val_accuracy for r in members if (s := summaries[r.job_id])]
        mean = statistics.aggregate(best).mean
        if mean is not None:
            best_means.append(mean)
    target_source = "query"
    if target is None:
        target_source = (
            f"default: {DEFAULT_TARGET_FRACTION:.0%} of the best configuration's "
            "mean best_val_accuracy"
        )
        target = DEFAULT_TARGET_FRACTION * max(best_means) if best_means else None
    reached: dict[uuid.UUID, int | None] = {
        run.job_id: statistics.epochs_to_target(run.epochs, run.val_accuracy, target)
        if target is not None and summaries[run.job_id] is not None
        else None
        for run in runs
    }

    rows = []
    for configuration in configurations:
        members = by_configuration.get(point_key(configuration), [])
        done = [s for r in members if (s := summaries[r.job_id]) is not None]
        to_target = [reached[r.job_id] for r in members if summaries[r.job_id] is not None]
        rows.append(
            {
                "configuration": configuration,
                "jobs": len(members),
                "succeeded": len(done),
                "diverged": sum(r.diverged for r in members),
                "pending": sum(r.status in ("queued", "running") for r in members),
                "best_val_accuracy": _aggregate([s.best_val_accuracy for s in done]),
                "final_val_accuracy": _aggregate([s.final_val_accuracy for s in done]),
                "final_val_loss": _aggregate([s.final_val_loss for s in done]),
                "generalization_gap_final": _aggregate([s.gap_final for s in done]),
                "generalization_gap_at_best": _aggregate([s.gap_at_best for s in done]),
                "epochs_to_target": {
                    **_aggregate([float(e) for e in to_target if e is not None]),
                    "never_reached": sum(e is None for e in to_target),
                },
                "step_loss_roughness": _aggregate([s.step_loss_roughness for s in done]),
                "seconds_per_epoch": _aggregate([s.seconds_per_epoch for s in done]),
                "packed": sum(r.pack is not None for r in members if summaries[r.job_id]),
            }
        )
        probed = _probe_rows(members, summaries)
        if probed:
            rows[-1]["probes"] = probed
    return {
        "complete": not counts["queued"] and not counts["running"],
        "counts": counts,
        "note": _pending_note(counts),
        "seconds_note": _seconds_note(runs, summaries),
        "target": {"val_accuracy": target, "source": target_source},
        "axes": list(grid),
        "configurations": rows,
        "max_stable_lr": max_stable_lr(grid, runs, summaries),
        "effects": effects(grid, runs, summaries, reached),
    }


def probe_values(run: Run, name: str) -> tuple[float | None, float | None]:
    """A run's mean over its epochs, and its last epoch's value, of one probe figure."""
    values = run.probes.get(name)
    if values is None or values.size == 0:
        return None, None
    finite = values[np.isfinite(values)]
    mean = float(finite.mean()) if finite.size else None
    return mean, float(values[-1]) if np.isfinite(values[-1]) else None


def _probe_rows(
    members: list[Run], summaries: dict[uuid.UUID, statistics.RunSummary | None]
) -> dict[str, Any]:
    """Per probe figure: the mean over seeds, with a bootstrap interval, of each seed's mean
    over epochs and of its final epoch's value. Only figures some run measured."""
    done = [r for r in members if summaries[r.job_id] is not None]
    rows: dict[str, Any] = {}
    for name in PROBE_METRICS:
        pairs = [probe_values(run, name) for run in done]
        if not any(mean is not None for mean, _ in pairs):
            continue
        rows[name] = {
            "over_epochs": asdict(statistics.mean_interval([mean for mean, _ in pairs])),
            "final_epoch": asdict(statistics.mean_interval([final for _, final in pairs])),
        }
    return rows


def max_stable_lr(
    grid: dict[str, list[Any]],
    runs: list[Run],
    summaries: dict[uuid.UUID, statistics.RunSummary | None],
) -> dict[str, Any] | None:
    """Per configuration without the learning rate: the largest lr at which no seed diverged
    and every seed ended above chance by CHANCE_MARGIN. None where lr is not an axis."""
    if LR_AXIS not in grid:
        return None
    others = {axis: values for axis, values in grid.items() if axis != LR_AXIS}
    groups: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        rest = configuration_of({a: v for a, v in run.grid_point.items() if a != LR_AXIS})
        lr_key = point_key({"lr": run.grid_point.get(LR_AXIS)})
        groups.setdefault(point_key(rest), {}).setdefault(lr_key, []).append(run)
    rows = []
    for configuration in configurations_in_order(others):
        by_lr = groups.get(point_key(configuration), {})
        verdicts = []
        for lr in sorted(grid[LR_AXIS]):
            members = by_lr.get(point_key({"lr": lr}), [])
            verdicts.append({"lr": lr, **_stability(members, summaries)})
        stable = [v["lr"] for v in verdicts if v["stable"]]
        rows.append(
            {
                "configuration": configuration,
                "max_stable_lr": max(stable) if stable else None,
                "by_lr": verdicts,
            }
        )
    return {"chance_margin": CHANCE_MARGIN, "configurations": rows}


def _stability(
    members: list[Run], summaries: dict[uuid.UUID, statistics.RunSummary | None]
) -> dict[str, Any]:
    diverged = sum(r.diverged for r in members)
    done = [(r, s) for r in members if (s := summaries[r.job_id]) is not None]
    if diverged:
        return {"stable": False, "reason": f"{diverged} of {len(members)} seeds diverged"}
    if not done:
        return {"stable": False, "reason": "no seed has finished"}
    for run, summary in done:
        chance = 1.0 / run.num_classes if run.num_classes else 0.0
        if summary.final_val_accuracy < chance + CHANCE_MARGIN:
            return {
                "stable": False,
                "reason": f"a seed ended at {summary.final_val_accuracy:.3g} accuracy, "
                f"within {CHANCE_MARGIN} of chance ({chance:.3g})",
            }
    return {"stable": True, "reason": f"{len(done)} seeds ended above chance, none diverged"}


def effects(
    grid: dict[str, list[Any]],
    runs: list[Run],
    summaries: dict[uuid.UUID, statistics.RunSummary | None],
    reached: dict[uuid.UUID, int | None],
) -> list[dict[str, Any]]:
    """Each axis value against its baseline, paired over the other axes and the seeds."""
    by_point = {point_key(run.grid_point): run for run in runs}
    found = []
    for axis, values in grid.items():
        if axis == SEED_AXIS or len(values) < 2:
            continue
        baseline = baseline_of(axis, values)
        # Runs by their value on this axis, once: matching every run against every value
        # was quadratic (seconds for a 1000-value axis, on each request for the report).
        by_value: dict[str, list[Run]] = {}
        for run in runs:
            by_value.setdefault(point_key({"v": run.grid_point.get(axis)}), []).append(run)
        for value in values:
            if value == baseline:
                continue
            pairs = []
            for run in by_value.get(point_key({"v": value}), []):
                partner = by_point.get(point_key({**run.grid_point, axis: baseline}))
                treated = summaries[run.job_id]
                base = summaries[partner.job_id] if partner else None
                if partner is not None and treated is not None and base is not None:
                    pairs.append((run, treated, partner, base))
            found.append(_effect(axis, value, baseline, pairs, reached))
    return found


def _effect(
    axis: str,
    value: Any,
    baseline: Any,
    pairs: list[tuple[Run, statistics.RunSummary, Run, statistics.RunSummary]],
    reached: dict[uuid.UUID, int | None],
) -> dict[str, Any]:
    label = label_of(axis, value)
    epoch_pairs = [
        (base_epochs, treated_epochs)
        for run, _, partner, _ in pairs
        if (treated_epochs := reached[run.job_id]) is not None
        and (base_epochs := reached[partner.job_id]) is not None
    ]
    ratio = statistics.paired_ratio([b for b, _ in epoch_pairs], [t for _, t in epoch_pairs])
    # A pair where only one side reached the target has no ratio, but leaving it out silently
    # would read "3x fewer epochs" for a value that never got there in half its seeds.
    only_baseline = sum(
        reached[run.job_id] is None and reached[partner.job_id] is not None
        for run, _, partner, _ in pairs
    )
    only_treated = sum(
        reached[run.job_id] is not None and reached[partner.job_id] is None
        for run, _, partner, _ in pairs
    )
    epoch_reading = statistics.read_epoch_ratio(label, ratio)
    if only_baseline or only_treated:
        epoch_reading += (
            f"; not counted: {only_baseline} pairs where only the baseline reached the "
            f"target, {only_treated} where only {label} did"
        )
    accuracy = statistics.paired_difference(
        [t.best_val_accuracy for _, t, _, _ in pairs],
        [b.best_val_accuracy for _, _, _, b in pairs],
    )
    gap_pairs = [
        (t.gap_final, b.gap_final)
        for _, t, _, b in pairs
        if t.gap_final is not None and b.gap_final is not None
    ]
    gap = statistics.paired_difference([t for t, _ in gap_pairs], [b for _, b in gap_pairs])
    found: dict[str, Any] = {
        "axis": axis,
        "value": value,
        "baseline": baseline,
        "pairs": len(pairs),
        "epochs_to_target": {
            **asdict(ratio),
            "kind": "ratio: baseline epochs / these epochs (above 1: fewer epochs)",
            "reading": epoch_reading,
        },
        "best_val_accuracy": {
            **asdict(accuracy),
            "kind": "difference: this - baseline",
            "reading": statistics.read_difference(
                label, "best val accuracy", accuracy, percentage_points=True
            ),
        },
        "generalization_gap": {
            **asdict(gap),
            "kind": "difference: this - baseline, final epoch",
            "reading": statistics.read_difference(label, "the generalization gap", gap),
        },
    }
    probes = _probe_effects(label, pairs)
    if probes:
        found["probes"] = probes
    return found


def _probe_effects(
    label: str, pairs: list[tuple[Run, statistics.RunSummary, Run, statistics.RunSummary]]
) -> dict[str, Any]:
    """Each probe figure (a run's mean over epochs): this - baseline, paired."""
    found: dict[str, Any] = {}
    for name in PROBE_METRICS:
        values = [
            (treated, base)
            for run, _, partner, _ in pairs
            if (treated := probe_values(run, name)[0]) is not None
            and (base := probe_values(partner, name)[0]) is not None
        ]
        if not values:
            continue
        effect = statistics.paired_difference([t for t, _ in values], [b for _, b in values])
        found[name] = {
            **asdict(effect),
            "kind": "difference: this - baseline, mean over epochs",
            "reading": statistics.read_difference(label, name.replace("_", " "), effect),
        }
    return found
