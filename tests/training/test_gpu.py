"""The CUDA path of the trainer: data and model on the GPU, bf16 autocast, resume there too.

Skipped without a GPU (tests/training/conftest.py); where one is: `pytest -m gpu tests/training`.
"""

import math
from typing import Any

import pytest
import torch

from app.core.spec import JobSpec
from tests.training.helpers import data_for, make_spec, train
from worker.training.dropout import Dropout, keep_mask, keep_thresholds, stream_key
from worker.training.loop import TrainingRun

pytestmark = pytest.mark.gpu


def gpu_spec(architecture: str, precision: str = "bf16", epochs: int = 4) -> JobSpec:
    return make_spec(
        model={
            "architecture": architecture,
            "hidden_sizes": [16, 16],
            "normalization": {"type": "batch_norm"},
            "dropout": {"rate": 0.1, "type": "standard" if architecture == "mlp" else "spatial"},
        },
        device="cuda",
        mixed_precision=precision,
        epochs=epochs,
    )


def _numbers(value: Any) -> list[float]:
    """Every number in a (nested) diagnostics value."""
    if isinstance(value, dict):
        return [n for item in value.values() for n in _numbers(item)]
    if isinstance(value, list):
        return [n for item in value for n in _numbers(item)]
    return [float(value)] if isinstance(value, int | float) else []


@pytest.mark.parametrize("architecture", ["mlp", "cnn", "resnet"])
def test_bf16_on_cuda_trains_with_data_and_weights_on_the_gpu(architecture: str) -> None:
    run, results = train(gpu_spec(architecture))
    assert run.device.type == "cuda"
    assert run.x_train.device.type == "cuda"  # batched by index on the device, no DataLoader
    # Autocast computes in bf16 but keeps the weights (and so the checkpoints) in fp32.
    assert {p.device.type for p in run.model.parameters()} == {"cuda"}
    assert {p.dtype for p in run.model.parameters()} == {torch.float32}
    for result in results:
        assert all(math.isfinite(v) for v in result.metrics.values())
        assert all(math.isfinite(n) for n in _numbers(result.diagnostics))
        assert result.diagnostics["layers"]
    # It learns: 4 epochs on 96 digits take the training loss well down from ln(10) = 2.3.
    assert results[-1].metrics["train_loss"] < results[0].metrics["train_loss"] - 0.1
    assert str(run.summary()["device"]).startswith("cuda")


def test_auto_picks_the_gpu_and_cpu_stays_on_cpu() -> None:
    auto, _ = train(make_spec(device="auto", epochs=1))
    cpu, _ = train(make_spec(device="cpu", epochs=1))
    assert (auto.device.type, cpu.device.type) == ("cuda", "cpu")


def test_resume_on_cuda_lands_where_the_uninterrupted_run_does() -> None:
    spec = gpu_spec("mlp", precision="none", epochs=3)
    full, full_results = train(spec)
    first = TrainingRun(spec, data_for(spec))
    next(first.epochs())
    weights, state = first.weights(), first.trainer_state()  # CUDA RNG state included
    del first
    resumed, resumed_results = train(spec, resume_weights=weights, resume_state=state)
    assert [r.epoch for r in resumed_results] == [2, 3]
    # CUDA promises no bit-exactness (the CPU tests hold the trainer to that); fp32 on one GPU
    # still lands on the uninterrupted run's weights to rounding.
    expected = full.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5)
    assert resumed_results[-1].metrics["val_accuracy"] == pytest.approx(
        full_results[-1].metrics["val_accuracy"], abs=0.02
    )


def test_dropout_masks_on_cuda_are_the_cpus() -> None:
    """Counter-based masks: integer arithmetic, bit for bit the same on either device, so a
    job's masks are the same alone, packed, on CPU and on CUDA."""
    keys = torch.tensor([stream_key((seed, 2, 7), "blocks.0.dropout") for seed in range(4)])
    rates = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64)
    shape = [64, 32, 40]
    cut = keep_thresholds(rates)
    cpu = keep_mask(keys, cut, shape, torch.empty(4, *shape))
    cuda = keep_mask(keys.cuda(), cut.cuda(), shape, torch.empty(4, *shape, device="cuda"))
    assert cuda.device.type == "cuda"
    assert torch.equal(cpu, cuda.cpu())


def test_a_cuda_job_drawing_blocks_of_steps_drops_what_a_cpu_job_drops() -> None:
    """A job alone on CUDA draws its masks a block of steps ahead (Dropout.steps_per_epoch);
    the elements it drops are those the CPU drops step by step."""
    ahead, stepwise = Dropout(0.3), Dropout(0.3)
    ahead.layer = stepwise.layer = "hidden.1.dropout"
    ahead.steps_per_epoch = 5
    ahead.cuda()
    for step in range(5):
        x = torch.randn(64, 128) + 3.0  # no zeros of its own
        ahead.position = stepwise.position = (11, 1, step)
        assert torch.equal(ahead(x.cuda()).cpu() == 0, stepwise(x) == 0)
