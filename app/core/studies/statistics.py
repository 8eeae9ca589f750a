"""The statistics of a study as plain functions over stored metrics (numpy arrays in, numbers out).

Every function is deterministic: the bootstrap is seeded, so a report reads the same twice.
"""

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


@dataclass(frozen=True)
class RunSummary:
    """One run's figures, from its per-epoch metrics."""

    best_val_accuracy: float
    best_epoch: int
    final_val_accuracy: float
    final_val_loss: float
    gap_final: float | None
    gap_at_best: float | None
    step_loss_roughness: float | None  # mean over epochs of the spread of step losses
    seconds_per_epoch: float


@dataclass(frozen=True)
class Aggregate:
    mean: float | None
    std: float | None  # sample standard deviation (ddof=1); None below two values
    n: int


@dataclass(frozen=True)
class Estimate:
    """A paired effect: the estimate, its bootstrap confidence interval and the pairs used."""

    estimate: float | None
    ci_low: float | None
    ci_high: float | None
    n: int


def _floats(values: ArrayLike) -> NDArray[np.float64]:
    return np.asarray(values, dtype=np.float64)


def _nanmean_or_none(values: NDArray[np.float64]) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def summarize_run(
    epochs: ArrayLike,
    val_loss: ArrayLike,
    val_accuracy: ArrayLike,
    gap: ArrayLike,
    step_loss_std: ArrayLike,
    epoch_seconds: ArrayLike,
) -> RunSummary | None:
    """A run's best and final figures; None for a run with no stored epoch. Missing
    diagnostics (NaN) are skipped; the best epoch is the first with the highest accuracy."""
    accuracy = _floats(val_accuracy)
    if accuracy.size == 0:
        return None
    epoch_numbers = np.asarray(epochs, dtype=np.int64)
    gaps = _floats(gap)
    best = int(np.argmax(accuracy))
    return RunSummary(
        best_val_accuracy=float(accuracy[best]),
        best_epoch=int(epoch_numbers[best]),
        final_val_accuracy=float(accuracy[-1]),
        final_val_loss=float(_floats(val_loss)[-1]),
        gap_final=float(gaps[-1]) if np.isfinite(gaps[-1]) else None,
        gap_at_best=float(gaps[best]) if np.isfinite(gaps[best]) else None,
        step_loss_roughness=_nanmean_or_none(_floats(step_loss_std)),
        seconds_per_epoch=float(_floats(epoch_seconds).mean()),
    )


def epochs_to_target(epochs: ArrayLike, val_accuracy: ArrayLike, target: float) -> int | None:
    """The first epoch whose validation accuracy reached the target; None if none did."""
    reached = np.flatnonzero(_floats(val_accuracy) >= target)
    return int(np.asarray(epochs)[reached[0]]) if reached.size else None


def aggregate(values: list[float | None] | list[float]) -> Aggregate:
    """Mean, sample standard deviation and count of the values that are present."""
    present = _floats([v for v in values if v is not None])
    if present.size == 0:
        return Aggregate(None, None, 0)
    std = float(present.std(ddof=1)) if present.size > 1 else None
    return Aggregate(float(present.mean()), std, int(present.size))


def _bootstrap_indices(n: int, resamples: int, seed: int) -> NDArray[np.int64]:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(statistics: NDArray[np.float64], confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(statistics, [tail, 100.0 - tail])
    return float(low), float(high)


def paired_difference(
    treated: ArrayLike,
    baseline: ArrayLike,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """Mean of treated - baseline over pairs, with a percentile bootstrap interval over pairs."""
    differences = _floats(treated) - _floats(baseline)
    n = int(differences.size)
    if n == 0:
        return Estimate(None, None, None, 0)
    estimate = float(differences.mean())
    if n < 2:
        return Estimate(estimate, None, None, n)
    means = differences[_bootstrap_indices(n, resamples, seed)].mean(axis=1)
    low, high = _interval(means, confidence)
    return Estimate(estimate, low, high, n)


def mean_interval(
    values: list[float | None] | list[float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """The mean of the values present, with a percentile bootstrap interval of the mean."""
    present = _floats([v for v in values if v is not None])
    present = present[np.isfinite(present)]
    n = int(present.size)
    if n == 0:
        return Estimate(None, None, None, 0)
    if n < 2:
        return Estimate(float(present.mean()), None, None, n)
    means = present[_bootstrap_indices(n, resamples, seed)].mean(axis=1)
    low, high = _interval(means, confidence)
    return Estimate(float(present.mean()), low, high, n)


def paired_ratio(
    baseline: ArrayLike,
    treated: ArrayLike,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """mean(baseline) / mean(treated) over pairs (e.g. 4.0: the treated needed a quarter of the
    epochs), with a percentile bootstrap interval that resamples whole pairs."""
    base, treat = _floats(baseline), _floats(treated)
    n = int(base.size)
    if n == 0 or float(treat.mean()) == 0.0:
        return Estimate(None, None, None, n)
    estimate = float(base.mean() / treat.mean())
    if n < 2:
        return Estimate(estimate, None, None, n)
    indices = _bootstrap_indices(n, resamples, seed)
    ratios = base[indices].mean(axis=1) / treat[indices].mean(axis=1)
    low, high = _interval(ratios, confidence)
    return Estimate(estimate, low, high, n)


def _number(value: float) -> str:
    return f"{value:.3g}"


# Fewer pairs than this and a percentile bootstrap's 95% interval is the range of the pairs'
# differences itself (each resample's mean lands on the smallest value more than 2.5% of the
# time): every difference on one side would read as an effect, two pairs' coin flip included.
MIN_PAIRS_TO_JUDGE = 4


def read_difference(
    label: str, metric: str, effect: Estimate, *, percentage_points: bool = False
) -> str:
    """One plain sentence that claims no more than the interval supports. An accuracy (a
    fraction) reads in percentage points, as the dashboard and a paper print it. A rise or
    fall reads as a size ("lowered it by 5.3 [3.9, 7.2]"), no effect as the signed interval."""
    if effect.estimate is None:
        return f"no pairs to compare {label} on {metric}"
    scale, unit = (100.0, " percentage points") if percentage_points else (1.0, "")
    estimate = scale * effect.estimate
    if effect.ci_low is None or effect.ci_high is None or effect.n < MIN_PAIRS_TO_JUDGE:
        return (
            f"too few pairs to judge {label} on {metric} (n={effect.n}; it takes "
            f"{MIN_PAIRS_TO_JUDGE}): {estimate:+.3g}{unit} on average"
        )
    low, high = scale * effect.ci_low, scale * effect.ci_high
    if low > 0:
        return (
            f"{label} raised {metric} by {estimate:.3g}{unit} "
            f"[{_number(low)}, {_number(high)}], n={effect.n}"
        )
    if high < 0:
        return (
            f"{label} lowered {metric} by {-estimate:.3g}{unit} "
            f"[{_number(-high)}, {_number(-low)}], n={effect.n}"
        )
    return (
        f"no detectable effect of {label} on {metric}: {estimate:+.3g}{unit} "
        f"[{_number(low)}, {_number(high)}], n={effect.n}"
    )


def read_epoch_ratio(label: str, effect: Estimate) -> str:
    """The same for a ratio of epochs to target (baseline over treated)."""
    if effect.estimate is None:
        return f"no pair where both {label} and its baseline reached the target (n={effect.n})"
    if effect.ci_low is None or effect.ci_high is None or effect.n < MIN_PAIRS_TO_JUDGE:
        # A ratio below 1 is more epochs: "0.5x fewer" read as a gain that was a loss.
        average = (
            f"{effect.estimate:.2g}x fewer"
            if effect.estimate >= 1
            else f"{1 / effect.estimate:.2g}x more"
        )
        return (
            f"too few pairs to judge {label} on epochs to target (n={effect.n}; it takes "
            f"{MIN_PAIRS_TO_JUDGE}): {average} on average"
        )
    low, high, ratio = effect.ci_low, effect.ci_high, effect.estimate
    if low > 1:
        return (
            f"{label} reached the target in {ratio:.2g}x fewer epochs "
            f"[{low:.2g}, {high:.2g}], n={effect.n}"
        )
    if high < 1:
        return (
            f"{label} needed {1 / ratio:.2g}x more epochs to reach the target "
            f"[{1 / high:.2g}, {1 / low:.2g}], n={effect.n}"
        )
    return (
        f"no detectable effect of {label} on epochs to target: "
        f"{ratio:.2g}x fewer [{low:.2g}, {high:.2g}], n={effect.n}"
    )
