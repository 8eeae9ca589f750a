"""Every architecture x normalization x dropout type trains, and counts its parameters exactly."""

import math

import pytest

from app.core.catalog import BUILTIN_DATASETS, DatasetInfo
from app.core.spec import SpecError, check_fits_dataset, count_parameters
from tests.training.helpers import make_spec, train

NORMS = ["none", "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"]
DROPOUTS = ["standard", "alpha", "spatial"]
MATRIX = [
    (architecture, norm, position, dropout)
    for architecture in ("mlp", "cnn", "resnet")
    for norm in NORMS
    for position in (
        ["before_activation"] if norm == "none" else ["before_activation", "after_activation"]
    )
    for dropout in DROPOUTS
    # What the spec refuses is tested below, not trained.
    if not (architecture == "mlp" and (norm == "instance_norm" or dropout == "spatial"))
    and (architecture, norm, position) != ("resnet", "instance_norm", "after_activation")
]


@pytest.mark.parametrize(("architecture", "norm", "position", "dropout"), MATRIX)
def test_combination_trains(architecture: str, norm: str, position: str, dropout: str) -> None:
    activation = "selu" if dropout == "alpha" else "relu"  # alpha dropout is made for SELU nets
    spec = make_spec(
        model={
            "architecture": architecture,
            "hidden_sizes": [8, 8],
            "activation": activation,
            "normalization": {"type": norm, "position": position, "num_groups": 4},
            "dropout": {"rate": [0.1, 0.2], "input_rate": 0.1, "type": dropout},
        }
    )
    run, results = train(spec)
    assert [r.epoch for r in results] == [1, 2]
    for result in results:
        assert all(math.isfinite(v) for v in result.metrics.values())
        assert 0.0 <= result.metrics["val_accuracy"] <= 1.0
        layers = result.diagnostics["layers"]
        assert any(layer["kind"] == "activation" for layer in layers)
        assert all(layer["weight_norm"] > 0 for layer in layers if "weight_norm" in layer)
    assert run.parameters == count_parameters(spec, BUILTIN_DATASETS["digits"])


@pytest.mark.parametrize("architecture", ["cnn", "resnet"])
def test_sequence_data_gets_1d_convolutions(architecture: str) -> None:
    spec = make_spec(
        dataset={"name": "mnist1d", "train_subset": 64, "batch_size": 32},
        model={
            "architecture": architecture,
            "hidden_sizes": [8],
            "normalization": {"type": "batch_norm"},
        },
        epochs=1,
    )
    run, [result] = train(spec)
    convs = {type(m).__name__ for m in run.model.modules()}
    assert "Conv1d" in convs
    assert "Conv2d" not in convs
    assert run.parameters == count_parameters(spec, BUILTIN_DATASETS["mnist1d"])
    assert math.isfinite(result.metrics["val_loss"])


@pytest.mark.parametrize(
    ("model", "field", "reason"),
    [
        ({"normalization": {"type": "instance_norm"}}, "normalization.type", "spatial positions"),
        ({"dropout": {"rate": 0.1, "type": "spatial"}}, "dropout.type", "whole channels"),
        (
            {"hidden_sizes": [8, 12], "normalization": {"type": "group_norm", "num_groups": 8}},
            "normalization.num_groups",
            "divisible",
        ),
        ({"hidden_sizes": [8, 8], "dropout": {"rate": [0.1]}}, "dropout.rate", "2 hidden layers"),
        # Each group one value: normalized to 0, so the output would be the same for any input.
        (
            {"hidden_sizes": [16, 8], "normalization": {"type": "group_norm", "num_groups": 8}},
            "normalization.num_groups",
            "not depend on the input",
        ),
        (
            {"hidden_sizes": [16, 1], "normalization": {"type": "layer_norm"}},
            "hidden_sizes",
            "not depend on the input",
        ),
    ],
)
def test_impossible_combinations_say_why(model: dict[str, object], field: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as raised:
        make_spec(model=model)
    cause = raised.value.errors()[0]["ctx"]["error"]  # type: ignore[attr-defined]
    assert isinstance(cause, SpecError)
    assert cause.field == field


@pytest.mark.parametrize(
    ("architecture", "dataset", "widths", "refused"),
    [
        ("resnet", "digits", [8, 8], True),  # the head averages the last block's output
        ("resnet", "mnist1d", [8], True),
        ("cnn", "digits", [8, 8], False),  # 8x8 -> 4x4 -> 2x2: a max pool after each block
        ("cnn", "digits", [8, 8, 8], True),  # at 2x2 the last block does not pool
        ("cnn", "mnist1d", [8, 8, 8], False),  # 40 -> 20 -> 10 -> 5
    ],
)
def test_instance_norm_that_the_head_would_average_away_is_refused(
    architecture: str, dataset: str, widths: list[int], refused: bool
) -> None:
    """Instance norm after the last activation leaves each channel a mean of exactly its bias;
    averaged over positions by the head, the logits could not depend on the input."""
    spec = make_spec(
        dataset={"name": dataset, "train_subset": 64, "batch_size": 32},
        model={
            "architecture": architecture,
            "hidden_sizes": widths,
            "normalization": {"type": "instance_norm", "position": "after_activation"},
        },
    )
    info = BUILTIN_DATASETS[dataset]
    if not refused:
        check_fits_dataset(spec, info)
        return
    with pytest.raises(SpecError, match="not depend on the input") as raised:
        check_fits_dataset(spec, info)
    assert raised.value.field == "model.normalization.position"
    before = spec.model.normalization.model_copy(update={"position": "before_activation"})
    check_fits_dataset(  # the same model with the norm before the activation learns
        spec.model_copy(update={"model": spec.model.model_copy(update={"normalization": before})}),
        info,
    )


@pytest.mark.parametrize("architecture", ["cnn", "resnet"])
def test_group_norm_of_one_channel_that_the_head_would_average_away_is_refused(
    architecture: str,
) -> None:
    """group_norm with as many groups as channels is instance_norm, and trained as badly
    (digits: 8x8 -> 4x4 -> 2x2, and the cnn's last block does not pool)."""
    norm = {"type": "group_norm", "num_groups": 8, "position": "after_activation"}
    model = {"architecture": architecture, "hidden_sizes": [16, 16, 8], "normalization": norm}
    spec = make_spec(model=model)
    digits = BUILTIN_DATASETS["digits"]
    with pytest.raises(SpecError, match="not depend on the input") as raised:
        check_fits_dataset(spec, digits)
    assert raised.value.field == "model.normalization.position"
    two_per_group = spec.model.model_copy(update={"hidden_sizes": [16, 16, 16]})
    check_fits_dataset(spec.model_copy(update={"model": two_per_group}), digits)


ONE_FEATURE = DatasetInfo("upload:00000000-0000-0000-0000-000000000001", "sequence", (1,), 2, 100)


@pytest.mark.parametrize(
    ("normalization", "batch_size", "field"),
    [
        # The worker failed: "Expected more than 1 spatial element when training".
        ({"type": "instance_norm"}, 32, "model.normalization.type"),
        # "Expected more than 1 value per channel when training".
        ({"type": "batch_norm"}, 1, "dataset.batch_size"),
        # These trained, to an output that no input changed.
        ({"type": "group_norm", "num_groups": 4}, 32, "model.normalization.num_groups"),
        ({"type": "layer_norm"}, 32, "model.hidden_sizes"),
    ],
)
def test_conv_norms_over_one_position_are_refused(
    normalization: dict[str, object], batch_size: int, field: str
) -> None:
    widths = [1] if normalization["type"] == "layer_norm" else [4]
    spec = make_spec(
        dataset={"name": ONE_FEATURE.name, "batch_size": batch_size},
        model={"architecture": "cnn", "hidden_sizes": widths, "normalization": normalization},
    )
    with pytest.raises(SpecError) as raised:
        check_fits_dataset(spec, ONE_FEATURE)
    assert raised.value.field == field
    check_fits_dataset(spec, BUILTIN_DATASETS["mnist1d"])  # 40 positions: each norm has values


def test_conv_batch_norm_over_one_position_refuses_per_example_noise() -> None:
    """The gradient-noise probe's micro-batch is a training forward too: of one sample at
    one position, batch norm has one value per channel."""
    spec = make_spec(
        dataset={"name": ONE_FEATURE.name},
        model={"architecture": "cnn", "hidden_sizes": [4], "normalization": {"type": "batch_norm"}},
        diagnostics={"gradient_noise": {"micro_batch_size": 1}},
    )
    with pytest.raises(SpecError, match="micro_batch_size of 2") as raised:
        check_fits_dataset(spec, ONE_FEATURE)
    assert raised.value.field == "diagnostics.gradient_noise.micro_batch_size"
    check_fits_dataset(spec, BUILTIN_DATASETS["mnist1d"])
