"""Optimizers, schedules, clipping, early stopping and divergence."""

import itertools
import math

import pytest
import torch

from app.core.spec import ScheduleSpec
from tests.training.helpers import data_for, make_spec, train
from worker.training.loop import Diverged, TrainingRun
from worker.training.optim import lr_factor


def _factors(schedule: dict[str, object], epochs: int = 10, steps: int = 10) -> list[float]:
    factor = lr_factor(ScheduleSpec.model_validate(schedule), 0.1, epochs, steps)
    return [factor(step) for step in range(epochs * steps)]


def test_schedules_have_the_promised_shapes() -> None:
    assert set(_factors({"type": "constant"})) == {1.0}
    step = _factors({"type": "step", "step_size": 3, "gamma": 0.5})
    assert (step[0], step[29], step[30], step[60]) == (1.0, 1.0, 0.5, 0.25)
    cosine = _factors({"type": "cosine", "min_lr": 0.001})
    assert cosine[0] == 1.0
    assert cosine[-1] == pytest.approx(0.01, abs=2e-3)  # min_lr / lr at the end
    assert all(a >= b for a, b in itertools.pairwise(cosine))
    warm = _factors({"type": "cosine", "warmup_epochs": 2})
    assert warm[0] == pytest.approx(0.1)
    assert warm[20] == pytest.approx(1.0)
    one_cycle = _factors({"type": "one_cycle"})
    peak = one_cycle.index(max(one_cycle))
    assert 25 <= peak <= 35
    assert one_cycle[0] < 0.05
    assert one_cycle[-1] < 0.01


@pytest.mark.parametrize(
    "optimizer",
    [
        {"type": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
        {"type": "adam", "lr": 0.01},
        {"type": "adamw", "lr": 0.01, "weight_decay": 0.01},
        {"type": "rmsprop", "lr": 0.001, "momentum": 0.5},
    ],
    ids=lambda o: o["type"],
)
def test_every_optimizer_learns(optimizer: dict[str, object]) -> None:
    spec = make_spec(optimizer=optimizer, epochs=4, dataset={"name": "iris", "batch_size": 16})
    _, results = train(spec)
    assert results[-1].metrics["train_loss"] < results[0].metrics["train_loss"]
    assert results[-1].metrics["val_accuracy"] > 0.5  # iris: three classes


def test_lr_reported_per_epoch_follows_the_schedule() -> None:
    spec = make_spec(
        epochs=4, optimizer={"type": "sgd", "lr": 0.1}, schedule={"type": "step", "step_size": 2}
    )
    _, results = train(spec)
    assert [round(r.metrics["lr"], 6) for r in results] == [0.1, 0.1, 0.01, 0.01]


def test_grad_clipping_bounds_every_update() -> None:
    max_norm = 0.01
    spec = make_spec(grad_clip_norm=max_norm, epochs=2)
    run = TrainingRun(spec, data_for(spec))
    norms: list[float] = []

    def check(optimizer: torch.optim.Optimizer, *_: object) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    run.optimizer.register_step_pre_hook(check)  # sees the gradients each update applies
    results = list(run.epochs())
    assert len(norms) == run.steps_per_epoch * spec.epochs  # every update was checked
    assert max(norms) <= max_norm * (1 + 1e-6)
    # The reported norm is the one before clipping: the bound had work to do.
    assert max(r.diagnostics["grad_norm_max"] for r in results) > 10 * max_norm


def test_early_stopping_ends_the_run_and_says_so() -> None:
    spec = make_spec(
        epochs=30,
        optimizer={"type": "sgd", "lr": 1e-9},  # nothing improves
        early_stopping={"metric": "val_loss", "patience": 2, "min_delta": 0.01},
    )
    run, results = train(spec)
    assert [r.epoch for r in results] == [1, 2, 3]
    assert run.summary()["stopped_early"] is True
    assert run.summary()["epochs_completed"] == 3


def test_divergence_names_epoch_and_step() -> None:
    # SELU has no saturation to hide behind: at this rate the loss overflows within two epochs.
    spec = make_spec(
        optimizer={"type": "sgd", "lr": 100.0, "momentum": 0.9},
        model={"hidden_sizes": [8, 8], "activation": "selu"},
        epochs=5,
    )
    with pytest.raises(Diverged) as raised:
        train(spec)
    assert raised.value.epoch >= 1
    assert raised.value.step >= 1
    assert f"epoch {raised.value.epoch}, step {raised.value.step}" in str(raised.value)


def test_summary_tracks_the_best_epoch() -> None:
    run, results = train(make_spec(epochs=3))
    best = max(results, key=lambda r: r.metrics["val_accuracy"])
    summary = run.summary()
    assert summary["best_epoch"] == best.epoch
    assert summary["best_val_accuracy"] == best.metrics["val_accuracy"]
    assert math.isclose(
        summary["final_generalization_gap"],
        results[-1].metrics["val_loss"] - results[-1].diagnostics["train_eval_loss"],
    )
    assert [r.improved for r in results].count(True) >= 1


def test_a_validation_loss_that_overflows_is_a_divergence(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights can overflow in evaluation while every step's loss stayed finite: that epoch
    cannot be stored (no database holds its NaN), and the job is as diverged as a NaN step."""
    monkeypatch.setattr(TrainingRun, "_evaluate", lambda *_: (float("inf"), 0.1))
    with pytest.raises(Diverged) as raised:
        train(make_spec(epochs=2))
    assert raised.value.epoch == 1
