"""Same spec and seed: bit-identical on CPU. Resumed from a checkpoint: as if never stopped."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors

from tests.training.helpers import comparable, data_for, make_spec, train
from worker.training.loop import TrainingRun

MODELS = {
    "mlp-batchnorm-dropout": {
        "hidden_sizes": [16, 8],
        "normalization": {"type": "batch_norm"},
        "dropout": {"rate": 0.3, "input_rate": 0.1},
    },
    "cnn-spatial-dropout": {
        "architecture": "cnn",
        "hidden_sizes": [8, 8],
        "normalization": {"type": "group_norm", "num_groups": 4},
        "dropout": {"rate": 0.2, "type": "spatial"},
    },
    "resnet-batchnorm-after": {
        "architecture": "resnet",
        "hidden_sizes": [8, 8],
        "normalization": {"type": "batch_norm", "position": "after_activation"},
        "dropout": {"rate": 0.1},
    },
}
SCHEDULE = {"type": "cosine", "warmup_epochs": 1}


@pytest.mark.parametrize("model", MODELS.values(), ids=MODELS.keys())
def test_same_seed_is_bit_identical(model: dict[str, object]) -> None:
    spec = make_spec(model=model, epochs=3, schedule=SCHEDULE)
    run_a, results_a = train(spec)
    run_b, results_b = train(spec)
    assert [comparable(r) for r in results_a] == [comparable(r) for r in results_b]
    assert run_a.weights() == run_b.weights()
    other_seed, _ = train(spec.model_copy(update={"seed": spec.seed + 1}))
    assert other_seed.weights() != run_a.weights()


@pytest.mark.parametrize("model", MODELS.values(), ids=MODELS.keys())
def test_resume_equals_uninterrupted_run(model: dict[str, object]) -> None:
    spec = make_spec(model=model, epochs=4, schedule=SCHEDULE)
    full, full_results = train(spec)

    # "Killed" after epoch 2: only what the checkpoint held survives.
    first = TrainingRun(spec, data_for(spec))
    epochs = first.epochs()
    for _ in range(2):
        next(epochs)
    weights, state = first.weights(), first.trainer_state()
    del first, epochs
    torch.manual_seed(12345)  # a new process would not share the old RNG state either

    resumed, resumed_results = train(spec, resume_weights=weights, resume_state=state)
    assert [r.epoch for r in resumed_results] == [3, 4]
    assert [comparable(r) for r in resumed_results] == [comparable(r) for r in full_results[2:]]
    assert resumed.weights() == full.weights()
    assert resumed.summary() | {"device": None} == full.summary() | {"device": None}


def test_checkpoint_is_plain_safetensors_weights() -> None:
    run, _ = train(make_spec(model=MODELS["mlp-batchnorm-dropout"], epochs=1))
    tensors = load_safetensors(run.weights())
    assert set(tensors) == set(run.model.state_dict())
    assert all(torch.equal(tensors[k], v) for k, v in run.model.state_dict().items())


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            MODELS["mlp-batchnorm-dropout"],
            {
                "hidden.0.linear.weight",
                "hidden.0.norm.running_mean",
                "hidden.1.linear.bias",
                "output.weight",
            },
        ),
        (
            MODELS["cnn-spatial-dropout"],
            {"blocks.0.conv.weight", "blocks.1.norm.weight", "head.linear.weight"},
        ),
        (
            MODELS["resnet-batchnorm-after"],
            {
                "stem.conv.weight",
                "stem.norm.running_var",
                "stages.0.blocks.0.first.conv.weight",
                "stages.1.blocks.0.output_norm.weight",
                "head.linear.bias",
            },
        ),
    ],
    ids=MODELS.keys(),
)
def test_checkpoints_and_layer_metrics_name_layers_for_what_they_are(
    model: dict[str, object], expected: set[str]
) -> None:
    run, [result] = train(make_spec(model=model, epochs=1))
    tensors = set(load_safetensors(run.weights()))
    assert expected <= tensors
    assert not any(name[0].isdigit() for name in tensors)  # no bare sequence index at the top
    layers = {layer["name"]: layer["kind"] for layer in result.diagnostics["layers"]}
    # Per-layer metrics use the checkpoint's module names: each weighted layer's weight is
    # the tensor "<name>.weight" of the file a user downloads.
    weighted = [name for name, kind in layers.items() if kind != "activation"]
    assert weighted
    assert all(f"{name}.weight" in tensors for name in weighted)
    assert any(name.endswith("activation") for name, kind in layers.items() if kind == "activation")


def test_weights_carry_their_epoch_and_the_callers_metadata(tmp_path: Path) -> None:
    run, _ = train(make_spec(epochs=2))
    path = tmp_path / "weights.safetensors"
    path.write_bytes(run.weights({"job_id": "j-1", "spec": "{}"}))
    with safe_open(str(path), framework="pt") as opened:
        assert opened.metadata() == {"job_id": "j-1", "spec": "{}", "epoch": "2"}


def test_trainer_state_is_a_safetensors_file_the_library_reads_whole() -> None:
    """No header parsed by hand: safetensors' own load() returns every part of the state."""
    run, _ = train(make_spec(epochs=1))
    tensors = load_safetensors(run.trainer_state())
    skeleton = json.loads(tensors["trainsvc.trainer_state"].numpy().tobytes())
    assert skeleton["progress"]["epoch"] == 1
    assert "s.rng_shuffle" in tensors
