"""Packed trials: a job trained in a pack gives what it gives alone (float64, CPU, to rounding).

Each test trains the same jobs twice: together in a PackedRun, and one by one in TrainingRun,
and compares every number (metrics, diagnostics, weights, trainer state).
"""

import dataclasses
import functools
import math
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_tensors
from torch.utils._python_dispatch import TorchDispatchMode

from app.core.catalog import BUILTIN_DATASETS
from app.core.spec import JobSpec
from tests.training.helpers import data_for, make_spec
from worker.training import packed as packed_module
from worker.training.checkpoint import unpack_state
from worker.training.data import PreparedData
from worker.training.dropout import keep_mask
from worker.training.loop import Diverged, EpochResult, TrainingRun
from worker.training.models import build_model
from worker.training.packed import (
    PackedRun,
    TrialEpoch,
    free_memory_bytes,
    pack_key,
    trial_memory_bytes,
)

TOLERANCE = 1e-10
# For bias - running_mean of a layer feeding batch norm under Adam or RMSprop (see
# weight_difference): measured up to 2e-10 (a CNN with RMSprop), 5e-11 for MLPs.
NOISY_BIAS_TOLERANCE = 1e-9
# A ResNet stacks up to nine batch norms fed by such biases, and its eval-mode losses (which see
# bias - running_mean) carry their noise: measured up to 1.3e-8 (2-D, RMSprop), while its
# training losses, gradient norms and weights agree to 1e-10. MLPs and CNNs stay below 1e-10.
NOISY_EVAL_TOLERANCE = 1e-7
EVAL_MODE = (
    "val_loss",
    "val_accuracy",
    "train_eval_loss",
    "train_eval_accuracy",
    "generalization_gap",
    "accuracy_gap",
)
FLOAT32_STATISTICS = ("pre_activation_mean", "pre_activation_std")
FLOAT32_RESOLUTION = 1e-6  # relative: a few float32 steps (2**-23 = 1.2e-7 each)
NORMS = ["none", "batch_norm", "layer_norm", "rms_norm", "group_norm"]
OPTIMIZERS = ["sgd", "adam", "adamw", "rmsprop"]
ARCHITECTURES = ["mlp", "cnn", "resnet"]


@pytest.fixture(autouse=True)
def float64() -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def data64(spec: JobSpec) -> PreparedData:
    data = data_for(spec)
    if torch.get_default_dtype() == torch.float32:
        return data
    return dataclasses.replace(data, x_train=data.x_train.double(), x_val=data.x_val.double())


def job(
    i: int,
    norm: str = "batch_norm",
    optimizer: str = "sgd",
    lr: float | None = None,
    *,
    architecture: str = "mlp",
    data: str = "digits",
    dropout: str = "standard",
    position: str = "before_activation",
    **fields: Any,
) -> JobSpec:
    """Trial i of a study: the same computation, different numbers (lr, seed, rates, ...).

    An MLP, or a small CNN or ResNet: 1-D on mnist1d's sequences, 2-D on digits' images. The
    ResNet has two blocks per stage: the first of the second stage projects its shortcut (the
    width changes), the others add the identity."""
    options: dict[str, Any] = {"type": optimizer, "lr": (0.05, 0.02, 0.1, 0.03)[i]}
    if optimizer != "sgd":
        options["lr"] /= 10
    if lr is not None:
        options["lr"] = lr
    if optimizer in ("sgd", "rmsprop"):
        options["momentum"] = 0.9 - 0.1 * i
    if optimizer == "sgd":
        options["nesterov"] = True
    if optimizer in ("adam", "adamw"):
        options["betas"] = [0.9 - 0.05 * i, 0.99 - 0.01 * i]
    options["weight_decay"] = 0.01 * i
    shape: dict[str, Any] = {}
    if architecture != "mlp":
        shape = {"architecture": architecture, "hidden_sizes": [4, 8]}
    if architecture == "resnet":
        shape["blocks_per_stage"] = 2
    payload: dict[str, Any] = {
        "dataset": {"name": data, "train_subset": 96, "batch_size": 32},
        "model": {
            "hidden_sizes": [8, 8],
            **shape,
            "normalization": {
                "type": norm,
                "position": position,
                "num_groups": 2,
                "momentum": 0.1 + 0.05 * i,
                "eps": 1e-5 * (i + 1),
            },
            "dropout": {
                "type": dropout,
                "rate": (0.3, 0.1, 0.2, 0.4)[i],
                "input_rate": 0.05 * (i + 1),
            },
        },
        "optimizer": options,
        "seed": 3 + 7 * i,
        "epochs": 4,
        "schedule": {"type": "cosine", "warmup_epochs": 1},
        "grad_clip_norm": 1.0 + i,
    }
    payload.update(fields)
    return make_spec(**payload)


def train_packed(specs: list[JobSpec], **kwargs: Any) -> tuple[PackedRun, dict[int, list[Any]]]:
    pack = PackedRun(specs, data64(specs[0]), **kwargs)
    results: dict[int, list[TrialEpoch]] = {i: [] for i in range(len(specs))}
    for outcomes in pack.epochs():
        for outcome in outcomes:
            results[outcome.trial].append(outcome)
    return pack, results


def train_alone(spec: JobSpec, **resume: bytes | None) -> tuple[TrainingRun, list[EpochResult]]:
    run = TrainingRun(spec, data64(spec), **resume)
    return run, list(run.epochs())


def difference(a: Any, b: Any, path: str = "") -> float:
    """The largest absolute difference between two nested records; structure must match."""
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        return max([difference(a[k], b[k], f"{path}.{k}") for k in a], default=0.0)
    if isinstance(a, list | tuple):
        assert len(a) == len(b), path
        return max(
            [difference(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=False))],
            default=0.0,
        )
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape, path
        assert a.dtype == b.dtype, path
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if a is None or isinstance(a, str | bool):
        assert a == b, (path, a, b)
        return 0.0
    return abs(float(a) - float(b))


def record(result: EpochResult | None) -> dict[str, Any]:
    """An epoch's numbers but its timing and its activation statistics (float32, below)."""
    assert result is not None
    metrics = {k: v for k, v in result.metrics.items() if k != "epoch_seconds"}
    layers = [
        {k: v for k, v in layer.items() if k not in FLOAT32_STATISTICS}
        for layer in result.diagnostics["layers"]
    ]
    diagnostics = {**result.diagnostics, "layers": layers}
    return {"epoch": result.epoch, "improved": result.improved, **metrics, **diagnostics}


def activation_statistics(result: EpochResult | None) -> list[float]:
    assert result is not None
    layers = result.diagnostics["layers"]
    return [layer[k] for layer in layers for k in FLOAT32_STATISTICS if k in layer]


def trains_bias_on_noise(spec: JobSpec) -> bool:
    """Whether biases feed batch or instance norm under Adam or RMSprop: see weight_difference."""
    norm = spec.model.normalization
    return (
        norm.type in ("batch_norm", "instance_norm")
        and norm.position == "before_activation"
        and spec.optimizer.type != "sgd"
    )


def eval_tolerance(spec: JobSpec) -> float:
    if spec.model.architecture == "resnet" and trains_bias_on_noise(spec):
        return NOISY_EVAL_TOLERANCE
    return TOLERANCE


def assert_same_epochs(
    a: Sequence[EpochResult | None],
    b: Sequence[EpochResult | None],
    tolerance: float = TOLERANCE,
    eval_mode: float | None = None,
) -> None:
    """Every number of two runs' epochs agrees to the tolerance (the eval-mode ones to
    eval_mode, where given), but the activation statistics: the single model's hook computes
    them in float32 (and the pack likewise, from the same values), so a float64 difference far
    below the tolerance can still round them a float32 step apart. They agree to float32's
    resolution."""
    records = [record(r) for r in a], [record(r) for r in b]
    train = [[{k: v for k, v in r.items() if k not in EVAL_MODE} for r in rs] for rs in records]
    evaluated = [[{k: r[k] for k in EVAL_MODE} for r in rs] for rs in records]
    assert difference(*train) < tolerance
    assert difference(*evaluated) < (eval_mode or tolerance)
    pairs = zip(
        [x for r in a for x in activation_statistics(r)],
        [x for r in b for x in activation_statistics(r)],
        strict=True,
    )
    for x, y in pairs:
        assert abs(x - y) <= max(tolerance, FLOAT32_RESOLUTION * max(1.0, abs(x))), (x, y)


def weight_difference(single: bytes, packed: bytes, spec: JobSpec) -> float:
    a, b = load_tensors(single), load_tensors(packed)
    assert set(a) == set(b)
    norm = spec.model.normalization
    if trains_bias_on_noise(spec):
        # The bias of a linear or conv layer that feeds batch or instance norm has a gradient
        # of exactly zero (the norm subtracts a per-channel mean: over the batch, or per
        # sample), so both runs train it on rounding noise, and Adam and RMSprop scale that
        # noise up to steps of about lr * noise / eps: once any weight differs by a rounding,
        # the two runs' noise differs. Training passes never see the bias; batch norm's eval
        # pass sees bias - running_mean, and as the running mean follows the bias with a lag,
        # some of the noise is left there (NOISY_BIAS_TOLERANCE). Compare the bias and the
        # running mean apart to 1e-8.
        modules = dict(build_model(spec.model, BUILTIN_DATASETS[spec.dataset.name]).named_modules())
        for name in [n for n in modules if n.endswith((".linear", ".conv"))]:
            block = name.rsplit(".", 1)[0]
            if f"{block}.norm" not in modules:
                continue
            bias, mean = f"{name}.bias", f"{block}.norm.running_mean"
            assert difference(a[bias], b[bias]) < 1e-8
            if norm.type == "batch_norm":
                assert difference(a[mean], b[mean]) < 1e-8
                assert difference(a[bias] - a[mean], b[bias] - b[mean]) < NOISY_BIAS_TOLERANCE
                del a[mean], b[mean]
            del a[bias], b[bias]
    return difference(a, b)


def assert_trials_train_as_alone(specs: list[JobSpec]) -> None:
    """Every number of every trial of the pack is its job's alone, to the tolerance."""
    pack, results = train_packed(specs)
    for i, spec in enumerate(specs):
        run, alone = train_alone(spec)
        packed = [outcome.result for outcome in results[i]]
        assert len(packed) == len(alone) == spec.epochs
        assert_same_epochs(alone, packed, eval_mode=eval_tolerance(spec))
        trial = pack.trials[i]
        assert weight_difference(run.weights(), trial.weights(), spec) < TOLERANCE
        assert weight_difference(run.weights(best=True), trial.weights(best=True), spec) < 1e-10
        # The summary's best validation numbers are eval-mode ones.
        assert trial.summary() == pytest.approx(run.summary(), abs=eval_tolerance(spec))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("norm", NORMS)
def test_a_trial_trains_as_its_job_alone(norm: str, optimizer: str) -> None:
    assert_trials_train_as_alone([job(i, norm, optimizer) for i in range(3)])


@pytest.mark.parametrize("data", ["mnist1d", "digits"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("norm", [*NORMS, "instance_norm"])
def test_a_cnn_trial_trains_as_its_job_alone(norm: str, optimizer: str, data: str) -> None:
    """Grouped convolutions, per-trial norms over channels and positions, spatial dropout."""
    specs = [
        job(i, norm, optimizer, architecture="cnn", data=data, dropout="spatial") for i in range(3)
    ]
    assert_trials_train_as_alone(specs)


@pytest.mark.parametrize("data", ["mnist1d", "digits"])
@pytest.mark.parametrize(
    ("dropout", "position"),
    [("standard", "after_activation"), ("alpha", "before_activation")],
)
def test_cnn_dropout_and_norm_position_pack_exactly(dropout: str, position: str, data: str) -> None:
    specs = [
        job(
            i,
            "batch_norm",
            "adam",
            architecture="cnn",
            data=data,
            dropout=dropout,
            position=position,
        )
        for i in range(3)
    ]
    assert_trials_train_as_alone(specs)


@pytest.mark.parametrize(
    ("norm", "position"),
    [
        (norm, position)
        for norm in [*NORMS, "instance_norm"]
        for position in ("before_activation", "after_activation")
        # The spec refuses this one: the head would average the output's instance norm away.
        if (norm, position) != ("instance_norm", "after_activation")
    ],
)
def test_a_resnet_trial_trains_as_its_job_alone(norm: str, position: str) -> None:
    """Residual blocks: a branch and a shortcut (identity, or a 1x1 projection) summed, with
    the normalization on the branch or on the block's output."""
    specs = [
        job(i, norm, "adam", architecture="resnet", data="mnist1d", position=position)
        for i in range(3)
    ]
    assert_trials_train_as_alone(specs)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_2d_resnet_trial_trains_as_its_job_alone(optimizer: str) -> None:
    specs = [
        job(i, "batch_norm", optimizer, architecture="resnet", dropout="spatial") for i in range(3)
    ]
    assert_trials_train_as_alone(specs)


def test_alpha_dropout_with_selu_packs_exactly() -> None:
    specs = [
        job(
            i,
            "none",
            "adam",
            model={
                "hidden_sizes": [8, 8],
                "activation": "selu",
                "dropout": {"type": "alpha", "rate": 0.1 * (i + 1)},
            },
        )
        for i in range(3)
    ]
    _, results = train_packed(specs)
    for i, spec in enumerate(specs):
        _, alone = train_alone(spec)
        packed = [outcome.result for outcome in results[i]]
        assert_same_epochs(alone, packed)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_position_and_company_do_not_change_a_trial(architecture: str) -> None:
    """The same job first in one pack, last in another with other jobs: the same numbers."""
    dropout = "standard" if architecture == "mlp" else "spatial"
    target = job(0, architecture=architecture, dropout=dropout)
    others = [job(i, architecture=architecture, dropout=dropout) for i in (1, 2, 3)]
    _, first = train_packed([target, others[0], others[1]])
    _, last = train_packed([others[2], others[0], target])
    assert_same_epochs([o.result for o in first[0]], [o.result for o in last[2]])


def test_a_diverging_trial_ends_diverged_and_the_others_go_on() -> None:
    specs = [job(0, "none", grad_clip_norm=None), job(1, "none", lr=100.0, grad_clip_norm=None)]
    specs.append(job(2, "none", grad_clip_norm=None))
    pack, results = train_packed(specs)
    failed = [o for o in results[1] if o.diverged is not None]
    assert len(failed) == 1
    assert results[1][-1].diverged is not None
    with pytest.raises(Diverged) as single_failure:
        train_alone(specs[1])
    assert str(single_failure.value) == str(failed[0].diverged)
    assert pack.trials[1].completed_epoch == len(results[1]) - 1
    for i in (0, 2):
        _, alone = train_alone(specs[i])
        packed = [o.result for o in results[i]]
        assert_same_epochs(alone, packed)


def test_a_trial_whose_validation_loss_overflows_ends_diverged_and_the_others_go_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Weights can overflow in evaluation while every step's loss stayed finite: the trial is
    as diverged as its job alone would be (TrainingRun's own test has the same case)."""
    evaluate = PackedRun._evaluate

    def overflowing(
        pack: PackedRun, x: torch.Tensor, y: torch.Tensor, captured: Any = None
    ) -> tuple[list[float], list[float]]:
        losses, accuracies = evaluate(pack, x, y, captured)
        if x is pack.x_val and pack.trials[1] in pack.active:
            losses[pack.active.index(pack.trials[1])] = math.inf
        return losses, accuracies

    monkeypatch.setattr(PackedRun, "_evaluate", overflowing)
    specs = [job(i, "batch_norm") for i in range(3)]
    pack, results = train_packed(specs)
    assert [o.result for o in results[1]] == [None]
    failed = results[1][0].diverged
    assert failed is not None
    assert (failed.epoch, failed.step) == (1, pack.steps_per_epoch)
    for i in (0, 2):
        _, alone = train_alone(specs[i])
        assert_same_epochs(alone, [o.result for o in results[i]])


def test_a_trial_that_leaves_mid_epoch_keeps_its_last_epoch_and_the_others_go_on() -> None:
    specs = [job(i) for i in range(3)]
    pack = PackedRun(specs, data64(specs[0]))
    calls = 0

    def leaving() -> set[int]:
        nonlocal calls
        calls += 1
        return {1} if calls >= 5 else set()  # mid-way through the second epoch

    results: dict[int, list[EpochResult]] = {0: [], 1: [], 2: []}
    for outcomes in pack.epochs(leaving):
        for outcome in outcomes:
            assert outcome.result is not None
            results[outcome.trial].append(outcome.result)
    assert len(results[1]) == 1
    assert pack.trials[1].completed_epoch == 1
    for i in (0, 2):
        _run, alone = train_alone(specs[i])
        assert_same_epochs(alone, results[i])
    # The one that left resumes alone from its stored epoch as if it had never been packed.
    trial = pack.trials[1]
    resumed, rest = train_alone(
        specs[1], resume_weights=trial.weights(), resume_state=trial.trainer_state()
    )
    full, alone = train_alone(specs[1])
    assert_same_epochs(alone[1:], rest)
    assert weight_difference(full.weights(), resumed.weights(), specs[1]) < TOLERANCE


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_trainer_states_cross_between_packed_and_alone(optimizer: str, architecture: str) -> None:
    specs = [job(i, "batch_norm", optimizer, architecture=architecture) for i in range(3)]
    # Alone for two epochs, then packed for the rest; and packed first, then alone.
    halves = []
    for spec in specs:
        run = TrainingRun(spec, data64(spec))
        epochs = run.epochs()
        for _ in range(2):
            next(epochs)
        halves.append((run.weights(), run.trainer_state()))
    pack, results = train_packed(specs, resume=halves)
    for i, spec in enumerate(specs):
        full, alone = train_alone(spec)
        packed = [o.result for o in results[i]]
        assert [r.epoch for r in packed] == [3, 4]
        assert_same_epochs(alone[2:], packed, eval_mode=eval_tolerance(spec))
        assert weight_difference(full.weights(), pack.trials[i].weights(), spec) < TOLERANCE
        # The packed state has TrainingRun's layout, value for value.
        single_state = unpack_state(full.trainer_state())
        packed_state = unpack_state(pack.trials[i].trainer_state())
        assert difference(single_state["scheduler"], packed_state["scheduler"]) == 0.0
        assert difference(single_state["optimizer"], packed_state["optimizer"]) < 1e-8
        assert single_state.keys() == packed_state.keys()
        assert torch.equal(single_state["rng_shuffle"], packed_state["rng_shuffle"])
    pack = PackedRun(specs, data64(specs[0]))
    epochs = pack.epochs()
    for _ in range(2):
        next(epochs)
    for trial, spec in zip(pack.trials, specs, strict=True):
        resumed, rest = train_alone(
            spec, resume_weights=trial.weights(), resume_state=trial.trainer_state()
        )
        full, alone = train_alone(spec)
        assert_same_epochs(alone[2:], rest, eval_mode=eval_tolerance(spec))
        assert weight_difference(full.weights(), resumed.weights(), spec) < TOLERANCE


@pytest.mark.parametrize("architecture", ["cnn", "resnet"])
@pytest.mark.parametrize("data", ["mnist1d", "digits"])
def test_a_packed_checkpoint_loads_into_the_single_model(data: str, architecture: str) -> None:
    specs = [job(i, "group_norm", "adam", architecture=architecture, data=data) for i in range(2)]
    pack, _ = train_packed(specs)
    run, _ = train_alone(specs[1])
    prepared = data64(specs[1])
    model = build_model(specs[1].model, prepared.info)
    model.load_state_dict(load_tensors(pack.trials[1].weights()))  # strict: names and shapes
    model.eval()
    run.model.eval()
    with torch.no_grad():
        logits, expected = model(prepared.x_val), run.model(prepared.x_val)
    assert float((logits - expected).abs().max()) < TOLERANCE


def test_early_stopping_takes_a_trial_out() -> None:
    stopping = {"metric": "val_accuracy", "patience": 1, "min_delta": 1.0}
    specs = [job(0, epochs=5, early_stopping=stopping), job(1, epochs=5)]
    pack, results = train_packed(specs)
    assert len(results[0]) == 2
    assert pack.trials[0].summary()["stopped_early"]
    assert len(results[1]) == 5
    _, alone = train_alone(specs[0])
    assert_same_epochs(alone, [o.result for o in results[0]])


def test_pack_key_holds_the_computation_not_the_numbers() -> None:
    base = job(0)
    assert (
        pack_key(base)
        == pack_key(job(1))
        == pack_key(
            job(
                2,
                dataset={
                    "name": "digits",
                    "train_subset": 96,
                    "batch_size": 32,
                    "label_noise": 0.2,
                },
            )
        )
    )
    assert pack_key(base) != pack_key(job(0, epochs=5))
    assert pack_key(base) != pack_key(job(0, "layer_norm"))
    assert pack_key(base) != pack_key(job(0, "batch_norm", "adam"))
    no_dropout = {"hidden_sizes": [8, 8], "dropout": {"rate": [0.0, 0.3]}}
    assert pack_key(job(0, model=no_dropout)) != pack_key(
        job(0, model={**no_dropout, "dropout": {"rate": [0.1, 0.3]}})
    )
    cnn = job(0, architecture="cnn")
    assert pack_key(cnn) == pack_key(job(1, architecture="cnn")) != pack_key(base)
    wider_kernel = cnn.model.model_copy(update={"kernel_size": 5})
    assert pack_key(cnn) != pack_key(cnn.model_copy(update={"model": wider_kernel}))
    assert pack_key(job(0, architecture="cnn", dropout="spatial")) != pack_key(cnn)
    resnet = job(0, architecture="resnet")
    assert pack_key(resnet) == pack_key(job(1, architecture="resnet")) != pack_key(cnn)
    deeper = resnet.model.model_copy(update={"blocks_per_stage": 3})
    assert pack_key(resnet) != pack_key(resnet.model_copy(update={"model": deeper}))
    probed = job(0, architecture="resnet", diagnostics={"gradient_noise": {}})
    assert pack_key(probed) is None  # a probed job trains alone
    # `diagnostics: {}` asks for no probe: it packed with nothing, not even its own kind.
    assert pack_key(job(0, architecture="resnet", diagnostics={})) == pack_key(resnet)
    with pytest.raises(ValueError, match="pack_key"):
        PackedRun([base, job(0, "layer_norm")], data64(base))


def test_label_noise_differs_per_trial() -> None:
    noisy = job(
        1, dataset={"name": "digits", "train_subset": 96, "batch_size": 32, "label_noise": 0.3}
    )
    specs = [job(0), noisy]
    labels = [data64(spec).y_train for spec in specs]
    pack = PackedRun(specs, data64(specs[0]), labels=labels)
    results = {0: [], 1: []}  # type: dict[int, list[EpochResult]]
    for outcomes in pack.epochs():
        for o in outcomes:
            assert o.result is not None
            results[o.trial].append(o.result)
    _, alone = train_alone(noisy)
    assert_same_epochs(alone, results[1])


def test_float32_metrics_agree_closely() -> None:
    """In float32 the kernels' rounding differs; the measured gap is in docs/benchmarks.md."""
    torch.set_default_dtype(torch.float32)
    specs = [job(i, "batch_norm", "adam") for i in range(3)]
    _, results = train_packed(specs)
    for i, spec in enumerate(specs):
        _, alone = train_alone(spec)
        for single, packed in zip(alone, (o.result for o in results[i]), strict=True):
            assert packed is not None
            for name in ("train_loss", "val_loss", "lr"):
                assert packed.metrics[name] == pytest.approx(single.metrics[name], abs=1e-3)
            for name in ("train_accuracy", "val_accuracy"):  # a sample or two may flip
                assert packed.metrics[name] == pytest.approx(single.metrics[name], abs=0.01)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_trials_memory_estimate_covers_what_the_pack_holds_for_it(architecture: str) -> None:
    specs = [job(i, "batch_norm", "adam", architecture=architecture, epochs=2) for i in range(2)]
    pack, _ = train_packed(specs)
    held = [*pack.tensors.values(), *(t for s in pack.optimizer_state.values() for t in s.values())]
    per_trial = sum(tensor.nbytes for tensor in held) // len(specs)
    info = BUILTIN_DATASETS[specs[0].dataset.name]
    estimate = trial_memory_bytes(specs[0], info)
    # The weights, buffers and Adam's slots held now, and their copy in the epoch's snapshot.
    assert estimate >= 2 * per_trial
    torch.set_default_dtype(torch.float32)
    assert trial_memory_bytes(specs[0], info) * 2 == estimate  # float64 takes twice float32's
    wider = specs[0].model.model_copy(update={"hidden_sizes": [16, 16]})
    assert trial_memory_bytes(specs[0].model_copy(update={"model": wider}), info) > estimate / 2


@pytest.mark.gpu
def test_memory_an_earlier_job_freed_counts_as_free_on_cuda() -> None:
    """The pack's memory budget: blocks the caching allocator keeps after a job are free to
    this process, though the driver counts them as used."""
    device = torch.device("cuda")
    before = free_memory_bytes(device)
    assert before is not None
    size = 1 << 30
    block = torch.empty(size, dtype=torch.uint8, device=device)
    held = free_memory_bytes(device)
    assert held is not None
    assert abs(before - held - size) < size // 8
    del block  # back to the cache, not to the driver
    assert torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device) >= size
    after = free_memory_bytes(device)
    assert after is not None
    assert abs(after - before) < size // 8


@pytest.mark.gpu
def test_a_pack_that_outgrows_the_gpu_frees_all_it_held_for_the_smaller_packs() -> None:
    """The CUDA half of a pack's out-of-memory split (its logic: tests/jobs/test_packing.py,
    with the OOM simulated): a pack of 8 under a memory cap of about 3 trials raises CUDA's
    OutOfMemoryError, and once the worker lets go of it, as it does (its frames cleared, the
    run dropped), its device memory is free and a pack of 2 trains under the same cap."""
    torch.set_default_dtype(torch.float32)
    device = torch.device("cuda")
    specs = [
        make_spec(
            dataset={"name": "digits", "train_subset": 256, "batch_size": 64},
            model={
                "hidden_sizes": [2048, 2048],
                "normalization": {"type": "batch_norm"},
                "dropout": {"rate": 0.1},
            },
            optimizer={"type": "adam", "lr": 1e-3},
            epochs=1,
            seed=seed,
            device="cuda",
        )
        for seed in range(8)
    ]
    torch.cuda.empty_cache()
    base = torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    train_packed(specs[:1])
    one = torch.cuda.max_memory_reserved(device) - base  # one trial's epoch, at its peak
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction((base + 3 * one) / total, device)
    try:
        with pytest.raises(torch.OutOfMemoryError) as caught:
            train_packed(specs)
        traceback.clear_frames(caught.value.__traceback__)
        del caught
        torch.cuda.empty_cache()
        assert torch.cuda.memory_reserved(device) < base + one // 2
        _, results = train_packed(specs[:2])
        assert [len(epochs) for epochs in results.values()] == [1, 1]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_packed_runs_on_cuda_with_per_trial_streams(architecture: str) -> None:
    torch.set_default_dtype(torch.float32)
    dropout = "standard" if architecture == "mlp" else "spatial"
    specs = [
        job(i, "batch_norm", "adam", architecture=architecture, dropout=dropout, device="cuda")
        for i in range(3)
    ]
    _, first = train_packed(specs)
    _, again = train_packed([specs[2], specs[0], specs[1]])
    # A trial's masks are a function of its seed, epoch and step (the same on CPU and CUDA, see
    # test_dropout_masks_on_cuda_are_the_cpus), so its results do not depend on the pack.
    assert_same_epochs([o.result for o in first[0]], [o.result for o in again[1]], 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_packed_training_step_never_waits_for_the_gpu(
    monkeypatch: pytest.MonkeyPatch, architecture: str
) -> None:
    """Small models are launch-bound on a GPU: a step that reads a device value on the host
    (a .item(), a bool() of a tensor) stalls the launches until the GPU has caught up, and
    cannot be captured in a CUDA graph (benchmarks/cuda_graphs.py). The whole step (batch,
    forward, loss, gradients, clipping, optimizer step) runs with torch's sync debug mode set
    to raise; the epoch's start and end (a copy of its tables, one deliberate sync) do not."""
    torch.set_default_dtype(torch.float32)

    def without_syncs(method: Any) -> Any:
        def run(self: PackedRun, *args: Any, **kwargs: Any) -> Any:
            torch.cuda.set_sync_debug_mode("error")
            try:
                return method(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return run

    monkeypatch.setattr(PackedRun, "_train_step", without_syncs(PackedRun._train_step))
    dropout = "standard" if architecture == "mlp" else "spatial"
    for optimizer in ("sgd", "adam", "adamw", "rmsprop"):
        # Weight decay, momentum, clipping, dropout rates and batch norm's eps and momentum
        # (one fused call per eps) differ between the trials.
        specs = [
            job(i, "batch_norm", optimizer, architecture=architecture, dropout=dropout)
            for i in range(3)
        ]
        specs = [s.model_copy(update={"device": "cuda", "epochs": 2}) for s in specs]
        _, results = train_packed(specs)
        assert [len(epochs) for epochs in results.values()] == [2, 2, 2], optimizer


# What, on CUDA, copies from the host or reads a device value on it: a tensor made from
# Python data (torch.tensor, a list used as an index: lift_fresh), a value read as a Python
# number (.item(), bool(), float(): _local_scalar_dense), and shapes that depend on values.
_WAITS_ON_CUDA = frozenset(
    {
        "aten.lift_fresh.default",
        "aten._local_scalar_dense.default",
        "aten.nonzero.default",
        "aten.masked_select.default",
    }
)


class _HostTraffic(TorchDispatchMode):
    """Fails on any operation of _WAITS_ON_CUDA."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if str(func) in _WAITS_ON_CUDA:
            raise AssertionError(f"the training step called {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_packed_training_step_takes_nothing_from_the_host(
    monkeypatch: pytest.MonkeyPatch, architecture: str
) -> None:
    """The CPU's half of test_a_packed_training_step_never_waits_for_the_gpu, which only a
    GPU runs: here the same step runs under a dispatch mode that fails on each operation that
    would wait on CUDA. (A list of layer positions used as an index did: each step copied it
    to the device, a blocking copy, and one that no CUDA graph can capture.)"""

    def watched(method: Any) -> Any:
        def run(self: PackedRun, *args: Any, **kwargs: Any) -> Any:
            with _HostTraffic():
                return method(self, *args, **kwargs)

        return run

    monkeypatch.setattr(PackedRun, "_train_step", watched(PackedRun._train_step))
    # The masks in torch's arithmetic, as CUDA draws them (on CPU numpy draws them).
    torch_masks = functools.partial(keep_mask, numpy_on_cpu=False)
    monkeypatch.setattr(packed_module, "keep_mask", torch_masks)
    dropout = "standard" if architecture == "mlp" else "spatial"
    for optimizer in OPTIMIZERS:
        specs = [
            job(i, "batch_norm", optimizer, architecture=architecture, dropout=dropout)
            for i in range(3)
        ]
        _, results = train_packed([s.model_copy(update={"epochs": 1}) for s in specs])
        assert [len(epochs) for epochs in results.values()] == [1, 1, 1], optimizer
