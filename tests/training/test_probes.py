"""The probes of issue 12 against values computed by hand, and the promise that they never
change a run: same weights, optimizer state, running statistics and random streams."""

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import ValidationError
from torch import nn

from app.core.spec import JobSpec
from tests.training.helpers import data_for, make_spec, train
from worker.training.dropout import position_of, set_position
from worker.training.loop import TrainingRun
from worker.training.probes import (
    LandscapeSample,
    measure_covariate_shift,
    measure_gradient_noise,
    measure_landscape,
    preserved,
)

# -- a tiny model whose quantities are computed here with plain autograd ---------------------


def _tiny() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    x = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return model, x, y


def _leaves(model: nn.Module) -> list[torch.Tensor]:
    """W1, b1, W2, b2 as fresh leaf tensors: nothing below goes through the model."""
    return [p.detach().clone().requires_grad_(True) for p in model.parameters()]


def _loss(theta: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = theta
    return F.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)


def _grad(theta: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in theta]
    return list(torch.autograd.grad(_loss(leaves, x, y), leaves))


def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((t**2).sum()) for t in tensors))


def test_landscape_matches_hand_computation() -> None:
    model, x, y = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    lr, multipliers = 0.3, [0.5, 1.0, 2.0, 4.0]
    theta = _leaves(model)
    g = _grad(theta, x, y)
    losses, differences, ratios = [], [], []
    for s in multipliers:
        moved = [t.detach() - s * lr * gi for t, gi in zip(theta, g, strict=True)]
        losses.append(float(_loss(moved, x, y)))
        difference = _norm([a - b for a, b in zip(g, _grad(moved, x, y), strict=True)])
        differences.append(difference)
        ratios.append(difference / (s * lr * _norm(g)))

    sample = measure_landscape(model, x, y, lr, multipliers)

    assert sample.loss == pytest.approx(float(_loss(theta, x, y).detach()), rel=1e-12)
    assert sample.grad_norm == pytest.approx(_norm(g), rel=1e-12)
    assert sample.loss_variation == pytest.approx(max(losses) - min(losses), rel=1e-9)
    assert sample.gradient_predictiveness == pytest.approx(max(differences), rel=1e-9)
    assert sample.beta_smoothness == pytest.approx(max(ratios), rel=1e-9)
    assert sample.loss_variation > 0
    assert sample.beta_smoothness > 0
    for p, saved in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, saved)


def test_landscape_of_a_quadratic_bowl_is_its_curvature() -> None:
    """A closed form to first order: over a tiny step -lr * g the gradient changes by
    -lr * H g (H the Hessian), so beta = |H g| / |g| and the gradient predictiveness is
    lr * |H g|; checked on one linear layer at w = 0, logits w.x, two classes."""
    torch.manual_seed(0)
    model = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0])
    weight = model.weight.detach().clone().requires_grad_(True)

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(x @ w.reshape(2, 2).T, y)

    (g,) = torch.autograd.grad(loss_of(weight.reshape(-1)), weight)
    hessian = torch.autograd.functional.hessian(loss_of, weight.detach().reshape(-1))
    flat = g.reshape(-1)
    curvature = float(torch.linalg.vector_norm(hessian @ flat) / torch.linalg.vector_norm(flat))

    sample = measure_landscape(model, x, y, lr=1e-6, multipliers=[1.0])

    assert sample.beta_smoothness == pytest.approx(curvature, rel=1e-5)
    assert sample.gradient_predictiveness == pytest.approx(
        1e-6 * curvature * float(flat.norm()), rel=1e-5
    )


def test_covariate_shift_matches_hand_computation() -> None:
    model, x, y = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    # The "update": any other weights; here a step that moves every parameter.
    after = [t - 0.2 * g for t, g in zip(before, _grad(before, x, y), strict=True)]
    with torch.no_grad():
        for p, value in zip(model.parameters(), after, strict=True):
            p.copy_(value)

    shifts = measure_covariate_shift(model, x, y, before)

    assert [s.name for s in shifts] == ["0", "2"]
    # Layer 1 has nothing before it: G' = G.
    assert shifts[0].l2 == 0.0
    assert shifts[0].cosine == pytest.approx(1.0, abs=1e-12)
    # Layer 2: G at theta_t; G' with W1, b1 updated and W2, b2 not.
    g = _grad(before, x, y)[2].reshape(-1)
    g_shifted = _grad([after[0], after[1], before[2], before[3]], x, y)[2].reshape(-1)
    l2 = float(torch.linalg.vector_norm(g - g_shifted))
    assert shifts[1].l2 == pytest.approx(l2, rel=1e-9)
    assert shifts[1].l2_relative == pytest.approx(l2 / float(g.norm()), rel=1e-9)
    cosine = float(g @ g_shifted / (g.norm() * g_shifted.norm()))
    assert shifts[1].cosine == pytest.approx(cosine, rel=1e-9)
    assert l2 > 0
    for p, value in zip(model.parameters(), after, strict=True):
        assert torch.equal(p, value)  # left at the updated weights


def test_gradient_noise_matches_per_example_estimate() -> None:
    model, x, y = _tiny()
    theta = [p.detach().clone() for p in model.parameters()]
    n = len(x)
    per_example = [
        torch.cat([g.reshape(-1) for g in _grad(theta, x[i : i + 1], y[i : i + 1])])
        for i in range(n)
    ]
    stacked = torch.stack(per_example)
    mean = stacked.mean(0)
    # Unbiased: tr of the sample covariance, and |G|^2 less the variance of the mean.
    trace = float(((stacked - mean) ** 2).sum() / (n - 1))
    grad_sq = float(mean @ mean) - trace / n

    sample = measure_gradient_noise(model, x, y, micro_batch_size=1)

    assert sample is not None
    assert sample.trace_sigma == pytest.approx(trace, rel=1e-9)
    assert sample.grad_sq_norm == pytest.approx(grad_sq, rel=1e-9)
    assert measure_gradient_noise(model, x, y, micro_batch_size=4) is None  # one micro-batch


def test_gradient_noise_with_micro_batches() -> None:
    """b = 2 over 6 samples: three micro-batch gradients G_i, B = 6."""
    model, x, y = _tiny()
    theta = [p.detach().clone() for p in model.parameters()]
    grads = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in _grad(theta, x[i : i + 2], y[i : i + 2])])
            for i in (0, 2, 4)
        ]
    )
    small = float((grads**2).sum(1).mean())
    big = float(grads.mean(0) @ grads.mean(0))
    sample = measure_gradient_noise(model, x, y, micro_batch_size=2)
    assert sample is not None
    assert sample.grad_sq_norm == pytest.approx((6 * big - 2 * small) / 4, rel=1e-9)
    assert sample.trace_sigma == pytest.approx((small - big) / (1 / 2 - 1 / 6), rel=1e-9)


# -- the spec ----------------------------------------------------------------------------------


def test_diagnostics_are_off_by_default_and_validated() -> None:
    assert make_spec().diagnostics is None
    spec = make_spec(diagnostics={"landscape": {}})
    assert spec.diagnostics is not None
    assert spec.diagnostics.landscape is not None
    assert spec.diagnostics.landscape.step_multipliers == [0.5, 1.0, 2.0, 4.0]
    assert spec.diagnostics.covariate_shift is None
    assert spec.diagnostics.gradient_noise is None
    bad: list[dict[str, Any]] = [
        {"landscape": {"every_steps": 0}},
        {"landscape": {"every_steps": 10001}},
        {"landscape": {"step_multipliers": [1.0, -1.0]}},
        {"landscape": {"step_multipliers": [0.0]}},
        {"landscape": {"step_multipliers": [float("inf")]}},
        {"landscape": {"step_multipliers": [1.0] * 9}},
        {"landscape": {"step_multipliers": []}},
        {"covariate_shift": {"every_steps": -1}},
        {"gradient_noise": {"micro_batch_size": 0}},
        {"gradient_probe": {}},
    ]
    for diagnostics in bad:
        with pytest.raises(ValidationError):
            make_spec(diagnostics=diagnostics)
    with pytest.raises(ValidationError, match="micro_batch_size"):
        make_spec(
            model={"hidden_sizes": [8], "normalization": {"type": "batch_norm"}},
            diagnostics={"gradient_noise": {"micro_batch_size": 1}},
        )


def test_per_example_noise_of_a_cnn_with_batch_norm() -> None:
    """A cnn's batch norm also averages over positions, so it trains on one sample, as its
    batch_size 1 does; a micro_batch_size of 1 was refused for it as for an mlp."""
    spec = make_spec(
        **MODELS["cnn-batchnorm-spatial-dropout-adam"],
        epochs=1,
        diagnostics={"gradient_noise": {"every_steps": 1, "micro_batch_size": 1}},
    )
    _, results = train(spec)
    report = results[-1].diagnostics["gradient_noise"]
    assert report["micro_batch_size"] == 1
    assert report["grad_norm_var"] > 0


# -- in the loop -------------------------------------------------------------------------------

ALL_PROBES = {
    "landscape": {"every_steps": 1},
    "covariate_shift": {"every_steps": 2},
    "gradient_noise": {"every_steps": 1, "micro_batch_size": 4},
}
MODELS: dict[str, dict[str, Any]] = {
    "mlp-batchnorm-dropout-sgd": {
        "model": {
            "hidden_sizes": [16, 8],
            "normalization": {"type": "batch_norm"},
            "dropout": {"rate": 0.3, "input_rate": 0.1},
        },
    },
    "cnn-batchnorm-spatial-dropout-adam": {
        "model": {
            "architecture": "cnn",
            "hidden_sizes": [4, 4],
            "normalization": {"type": "batch_norm"},
            "dropout": {"rate": 0.2, "type": "spatial"},
        },
        "optimizer": {"type": "adam", "lr": 0.01},
    },
    "resnet-layernorm-dropout": {
        "model": {
            "architecture": "resnet",
            "hidden_sizes": [4],
            "normalization": {"type": "layer_norm"},
            "dropout": {"rate": 0.1},
        },
        "schedule": {"type": "cosine"},
    },
}


def _state(run: TrainingRun) -> dict[str, torch.Tensor]:
    state = dict(run.model.state_dict())  # weights and batch-norm running statistics
    for index, per_param in run.optimizer.state_dict()["state"].items():
        for key, value in per_param.items():
            state[f"optimizer.{index}.{key}"] = torch.as_tensor(value)
    state["rng_shuffle"] = run.shuffle.get_state()
    return state


@pytest.mark.parametrize("fields", MODELS.values(), ids=MODELS.keys())
def test_probes_do_not_change_the_trajectory(fields: dict[str, Any]) -> None:
    plain_run, plain = train(make_spec(**fields, epochs=2))
    plain_state = _state(plain_run)
    probed_run, probed = train(make_spec(**fields, epochs=2, diagnostics=ALL_PROBES))
    probed_state = _state(probed_run)

    assert plain_state.keys() == probed_state.keys()
    for key, value in plain_state.items():
        assert torch.equal(value, probed_state[key]), key
    for a, b in zip(plain, probed, strict=True):
        assert {k: v for k, v in a.metrics.items() if k != "epoch_seconds"} == {
            k: v for k, v in b.metrics.items() if k != "epoch_seconds"
        }
    assert plain_run.weights() == probed_run.weights()
    report = probed[-1].diagnostics
    steps = probed_run.steps_per_epoch
    assert report["landscape"]["samples"] == steps
    assert report["covariate_shift"]["samples"] == math.ceil(steps / 2)
    assert report["gradient_noise"]["samples"] == steps
    assert report["landscape"]["loss_variation_mean"] > 0
    assert report["gradient_noise"]["grad_norm_var"] > 0
    layers = report["covariate_shift"]["layers"]
    assert len(layers) == len(probed_run.layer_diagnostics.layers)
    assert all(-1.0 <= layer["ics_cosine"] <= 1.0 + 1e-6 for layer in layers)


def test_a_job_without_diagnostics_runs_no_extra_pass() -> None:
    """No probe object, no extra forward pass, no probe keys in the epoch's diagnostics."""
    spec = make_spec(epochs=1)
    run = TrainingRun(spec, data_for(spec))
    assert run.probes is None
    calls = 0

    def count(*_: object) -> None:
        nonlocal calls
        calls += 1

    run.model.register_forward_hook(count)
    (result,) = list(run.epochs())
    assert calls == run.steps_per_epoch + 2  # the steps, validation, the training slice
    assert not {"landscape", "covariate_shift", "gradient_noise"} & result.diagnostics.keys()

    probed = TrainingRun(make_spec(epochs=1, diagnostics=ALL_PROBES), data_for(spec))
    probed_calls = 0

    def count_probed(*_: object) -> None:
        nonlocal probed_calls
        probed_calls += 1

    probed.model.register_forward_hook(count_probed)
    list(probed.epochs())
    assert probed_calls > calls  # the hook does see probe passes


def test_an_epoch_shorter_than_every_steps_still_has_a_sample() -> None:
    spec = make_spec(epochs=2, diagnostics={"landscape": {"every_steps": 10_000}})
    _, results = train(spec)
    assert [r.diagnostics["landscape"]["samples"] for r in results] == [1, 1]


def test_spec_round_trips_with_diagnostics() -> None:
    spec = make_spec(diagnostics=ALL_PROBES)
    assert JobSpec.model_validate(spec.model_dump()) == spec


def test_a_probe_that_overflows_reports_none_not_nan() -> None:
    """A step of 1000 x lr may overflow where training does not: stored as null, since JSON
    (and PostgreSQL's json) cannot carry NaN."""
    spec = make_spec(
        epochs=1,
        optimizer={"type": "sgd", "lr": 100.0},
        diagnostics={"landscape": {"every_steps": 1, "step_multipliers": [1000.0]}},
        model={"hidden_sizes": [8], "activation": "tanh"},
    )
    run = TrainingRun(spec, data_for(spec))
    run.probes.landscape.append(  # type: ignore[union-attr]
        LandscapeSample(float("nan"), 1.0, float("inf"), 1.0, 1.0)
    )
    report = run.probes.epoch_report(torch.ones(3))  # type: ignore[union-attr]
    assert report["landscape"]["loss_variation_max"] is None
    assert report["landscape"]["gradient_predictiveness_max"] == 1.0


def test_a_probe_puts_back_the_dropout_layers_stream_position_and_modes() -> None:
    """A probe may draw masks at positions of its own (tagged) and switch dropout off; on
    exit the model draws from the training step's position again, in its own modes."""
    spec = make_spec(model={"hidden_sizes": [8], "dropout": {"rate": 0.5, "input_rate": 0.2}})
    run = TrainingRun(spec, data_for(spec))
    model, x = run.model, run.x_train[:16]
    set_position(model, (spec.seed, 1, 4))
    before = model(x)
    for dropout in (True, False):
        with preserved(model, dropout=dropout):
            set_position(model, (spec.seed, 1, 4, "gradient-noise", 0))
            model(x)
        assert position_of(model) == (spec.seed, 1, 4)
        assert all(module.training for module in model.modules())
        assert torch.equal(model(x), before)
