"""The study statistics against values computed by hand."""

import math

import numpy as np
import pytest

from app.core.studies import statistics
from app.core.studies.statistics import Estimate


def test_summarize_run_takes_best_final_and_means() -> None:
    summary = statistics.summarize_run(
        epochs=[1, 2, 3],
        val_loss=[1.0, 0.5, 0.6],
        val_accuracy=[0.5, 0.8, 0.7],
        gap=[0.1, 0.2, 0.4],
        step_loss_std=[0.2, 0.4, math.nan],
        epoch_seconds=[1.0, 2.0, 3.0],
    )
    assert summary is not None
    assert summary.best_val_accuracy == 0.8
    assert summary.best_epoch == 2
    assert summary.final_val_accuracy == 0.7
    assert summary.final_val_loss == 0.6
    assert summary.gap_final == 0.4
    assert summary.gap_at_best == 0.2
    assert summary.step_loss_roughness == pytest.approx(0.3)  # the NaN epoch is skipped
    assert summary.seconds_per_epoch == 2.0
    assert statistics.summarize_run([], [], [], [], [], []) is None


def test_best_epoch_is_the_first_of_equal_bests() -> None:
    summary = statistics.summarize_run(
        [1, 2, 3], [1, 1, 1], [0.8, 0.9, 0.9], [0, 1, 2], [0] * 3, [1] * 3
    )
    assert summary is not None
    assert (summary.best_epoch, summary.gap_at_best) == (2, 1.0)


def test_epochs_to_target() -> None:
    assert statistics.epochs_to_target([1, 2, 3], [0.5, 0.8, 0.9], 0.8) == 2
    assert statistics.epochs_to_target([1, 2, 3], [0.5, 0.8, 0.9], 0.95) is None
    assert statistics.epochs_to_target([4, 5], [0.9, 0.95], 0.5) == 4  # epoch numbers, not indices


def test_aggregate_uses_sample_std_and_skips_missing() -> None:
    result = statistics.aggregate([1.0, 2.0, 3.0, None])
    assert (result.mean, result.std, result.n) == (2.0, 1.0, 3)
    assert statistics.aggregate([5.0]) == statistics.Aggregate(5.0, None, 1)
    assert statistics.aggregate([]) == statistics.Aggregate(None, None, 0)


def test_paired_difference_constant_differences_have_a_point_interval() -> None:
    effect = statistics.paired_difference([0.3, 0.5, 0.7], [0.2, 0.4, 0.6])
    assert effect.estimate == pytest.approx(0.1)
    assert effect.ci_low == pytest.approx(0.1)
    assert effect.ci_high == pytest.approx(0.1)
    assert effect.n == 3


def test_paired_difference_interval_for_two_pairs() -> None:
    # Differences 0 and 1: a resample's mean is 0, 0.5 or 1 with chances 1/4, 1/2, 1/4, so
    # the 2.5th and 97.5th percentiles of 2000 resamples are 0 and 1.
    effect = statistics.paired_difference([1.0, 2.0], [1.0, 1.0])
    assert (effect.estimate, effect.ci_low, effect.ci_high, effect.n) == (0.5, 0.0, 1.0, 2)


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(7)
    treated, baseline = rng.normal(1.0, 1.0, 20), rng.normal(0.0, 1.0, 20)
    first = statistics.paired_difference(treated, baseline)
    assert first == statistics.paired_difference(treated, baseline)
    assert first.ci_low is not None
    assert first.ci_high is not None
    assert first.ci_low < first.estimate < first.ci_high  # type: ignore[operator]


def test_paired_ratio_is_baseline_over_treated() -> None:
    effect = statistics.paired_ratio([4, 8], [1, 2])
    assert (effect.estimate, effect.ci_low, effect.ci_high, effect.n) == (4.0, 4.0, 4.0, 2)
    assert statistics.paired_ratio([], []).estimate is None
    single = statistics.paired_ratio([3], [1])
    assert (single.estimate, single.ci_low) == (3.0, None)


def test_readings_claim_no_more_than_the_interval() -> None:
    read = statistics.read_difference
    assert read("batch_norm", "best val accuracy", Estimate(0.05, 0.02, 0.08, 9)) == (
        "batch_norm raised best val accuracy by 0.05 [0.02, 0.08], n=9"
    )
    # An accuracy reads as the dashboard prints its estimate: in percentage points.
    points = read(
        "batch_norm",
        "best val accuracy",
        Estimate(0.0065, 0.00139, 0.0121, 6),
        percentage_points=True,
    )
    assert points == (
        "batch_norm raised best val accuracy by 0.65 percentage points [0.139, 1.21], n=6"
    )
    assert read("dropout 0.5", "the generalization gap", Estimate(-0.1, -0.2, -0.05, 6)) == (
        "dropout 0.5 lowered the generalization gap by 0.1 [0.05, 0.2], n=6"
    )
    assert read("dropout 0.5", "the generalization gap", Estimate(-0.004, -0.02, 0.01, 6)) == (
        "no detectable effect of dropout 0.5 on the generalization gap: -0.004 [-0.02, 0.01], n=6"
    )
    assert "too few pairs" in read("x", "y", Estimate(0.1, None, None, 1))
    # Three pairs on one side: the percentile interval is just their range, so no claim.
    assert read("dropout 0.5", "the generalization gap", Estimate(0.17, 0.03, 0.38, 3)) == (
        "too few pairs to judge dropout 0.5 on the generalization gap (n=3; it takes 4): "
        "+0.17 on average"
    )
    assert statistics.read_epoch_ratio("x", Estimate(3.0, 3.0, 3.0, 2)).startswith("too few")
    ratio = statistics.read_epoch_ratio
    # Half the baseline's speed is twice the epochs, not "0.5x fewer".
    assert ratio("lr 50.0", Estimate(0.5, None, None, 1)) == (
        "too few pairs to judge lr 50.0 on epochs to target (n=1; it takes 4): 2x more on average"
    )
    assert ratio("batch_norm", Estimate(4.1, 3.2, 5.0, 9)) == (
        "batch_norm reached the target in 4.1x fewer epochs [3.2, 5], n=9"
    )
    assert ratio("lr 1.0", Estimate(0.5, 0.25, 0.8, 4)) == (
        "lr 1.0 needed 2x more epochs to reach the target [1.2, 4], n=4"
    )
    assert ratio("layer_norm", Estimate(1.1, 0.8, 1.5, 6)).startswith(
        "no detectable effect of layer_norm on epochs to target"
    )
