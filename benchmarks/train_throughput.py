"""Training throughput: the service's trainer against a plain tutorial-style PyTorch loop.

Both train the same model (built from the same spec), on the same prepared data, batch size,
optimizer and epochs, in this one process, alternating run by run so that drift on the
machine hits both alike. The trainer does everything it does in service (per-epoch
validation, an eval-mode pass over training data, per-layer diagnostics, divergence check);
the baseline is written as PyTorch's quickstart tutorial writes it: a DataLoader over a
TensorDataset, model.train(), optimizer.step(), and the held-out loss and accuracy after each
epoch (its test() loop), and nothing else; its dropout layers are torch's own, drawing from
torch's generator, where the trainer's draw counter-based masks (worker/training/dropout.py).
Prints samples/second for each and their ratio (the median of the rounds).

    python benchmarks/train_throughput.py [--device cpu|cuda] [--rounds 5]
"""

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from app.core.catalog import BUILTIN_DATASETS
from app.core.spec import JobSpec
from worker.training.data import PreparedData, load_builtin, prepare
from worker.training.dropout import Dropout, dropouts
from worker.training.loop import TrainingRun
from worker.training.models import build_model
from worker.training.optim import build_optimizer

CASES: dict[str, dict[str, Any]] = {
    "mlp+batch_norm+dropout on digits": {
        "dataset": {"name": "digits", "batch_size": 64},
        "model": {
            "architecture": "mlp",
            "hidden_sizes": [128, 64],
            "normalization": {"type": "batch_norm"},
            "dropout": {"rate": 0.2},
        },
        "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
        "epochs": 10,
    },
    "cnn on mnist1d": {
        "dataset": {"name": "mnist1d", "batch_size": 64},
        "model": {
            "architecture": "cnn",
            "hidden_sizes": [32, 64],
            "normalization": {"type": "batch_norm"},
        },
        "optimizer": {"type": "adam", "lr": 0.001},
        "epochs": 5,
    },
}


def trainer_run(spec: JobSpec, data: PreparedData) -> float:
    run = TrainingRun(spec, data)
    started = time.perf_counter()
    for _ in run.epochs():
        pass
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


class TorchDropout(nn.Module):
    """The tutorial's dropout: torch's functional dropout, from torch's global generator."""

    def __init__(self, layer: Dropout) -> None:
        super().__init__()
        self.p, self.alpha, self.feature = layer.p, layer.alpha, layer.feature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.alpha:
            return F.alpha_dropout(x, self.p, self.training)
        if self.feature:
            return torch.feature_dropout(x, self.p, self.training)
        return F.dropout(x, self.p, self.training)


def tutorial_model(spec: JobSpec, data: PreparedData) -> nn.Module:
    """The spec's model as a tutorial holds it: with torch's dropout in place of ours."""
    model = build_model(spec.model, data.info)
    for name, layer in dropouts(model):
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, TorchDropout(layer))
    return model


def tutorial_run(spec: JobSpec, data: PreparedData) -> float:
    device = torch.device("cuda" if spec.device == "cuda" else "cpu")
    torch.manual_seed(spec.seed)
    model = tutorial_model(spec, data).to(device)
    optimizer = build_optimizer(spec.optimizer, model.parameters())
    batch_size = spec.dataset.batch_size
    loader = DataLoader(
        TensorDataset(data.x_train, data.y_train), batch_size=batch_size, shuffle=True
    )
    val_loader = DataLoader(TensorDataset(data.x_val, data.y_val), batch_size=batch_size)
    started = time.perf_counter()
    for _ in range(spec.epochs):
        model.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        # PyTorch's quickstart evaluates every epoch: test(dataloader, model, loss_fn).
        model.eval()
        val_loss, correct = 0.0, 0
        with torch.no_grad():
            for x, y in val_loader:
                x, y = x.to(device), y.to(device)
                logits = model(x)
                val_loss += F.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(1) == y).sum().item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(name: str, payload: dict[str, Any], device: str, rounds: int) -> dict[str, float]:
    spec = JobSpec.model_validate({**payload, "device": device})
    info = BUILTIN_DATASETS[spec.dataset.name]
    data = prepare(spec.dataset, info, load_builtin(spec.dataset))
    samples = len(data.x_train) * spec.epochs
    runners: dict[str, Callable[[JobSpec, PreparedData], float]] = {
        "trainer": trainer_run,
        "tutorial": tutorial_run,
    }
    for runner in runners.values():  # warm-up: allocator, kernels, first-call overheads
        runner(spec.model_copy(update={"epochs": 1}), data)
    rates: dict[str, list[float]] = {key: [] for key in runners}
    for _ in range(rounds):
        for key, runner in runners.items():
            rates[key].append(samples / runner(spec, data))
    trainer, tutorial = statistics.median(rates["trainer"]), statistics.median(rates["tutorial"])
    print(
        f"| {name} | {device} | {trainer:,.0f} | {tutorial:,.0f} | {trainer / tutorial:.2f}x |",
        flush=True,
    )
    return {"trainer": trainer, "tutorial": tutorial}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", end="")
    print(f", {torch.cuda.get_device_name()}" if args.device == "cuda" else "")
    print("| case | device | trainer samples/s | tutorial loop samples/s | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, payload in CASES.items():
        measure(name, payload, args.device, args.rounds)


if __name__ == "__main__":
    main()
